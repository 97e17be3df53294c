"""registry entries and runs; job revision, webhook and warm-start key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:36:22.215746
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('registry_entries',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=300), nullable=False),
    sa.Column('request', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('schedule', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('regression_threshold', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('registry_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_registry_entries_next_run_at'), ['next_run_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_registry_entries_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('registry_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('entry_id', sa.String(length=36), nullable=False),
    sa.Column('fired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('revision', sa.String(length=200), nullable=True),
    sa.Column('options_hash', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.ForeignKeyConstraint(['entry_id'], ['registry_entries.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('registry_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_registry_runs_entry_id'), ['entry_id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('registry_entry_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('webhook_url', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('revision', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('sensitivity_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_registry_entry_id'), ['registry_entry_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_sensitivity_key'), ['sensitivity_key'], unique=False)
        batch_op.create_foreign_key('fk_jobs_registry_entry_id', 'registry_entries', ['registry_entry_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # WARNING: constraint name is None; this directive will fail as
        # rendered.  Add a name, or use a naming convention; see
        # https://alembic.sqlalchemy.org/en/latest/naming.html
        batch_op.drop_constraint('fk_jobs_registry_entry_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_sensitivity_key'))
        batch_op.drop_index(batch_op.f('ix_jobs_registry_entry_id'))
        batch_op.drop_column('sensitivity_key')
        batch_op.drop_column('revision')
        batch_op.drop_column('webhook_url')
        batch_op.drop_column('registry_entry_id')

    with op.batch_alter_table('registry_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_registry_runs_entry_id'))

    op.drop_table('registry_runs')
    with op.batch_alter_table('registry_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_registry_entries_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_registry_entries_next_run_at'))

    op.drop_table('registry_entries')
