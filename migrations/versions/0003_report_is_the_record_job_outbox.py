"""the report is a job's one record of its results; jobs remember when they were published

Layer and search-step rows duplicated the report stored in jobs.report; the API now serves them from
the report, so the tables go. jobs.enqueued_at makes the jobs table an outbox: a job is stored first
and published after, and the sweeper publishes any that were not.

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('search_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_search_steps_job_id'))
    op.drop_table('search_steps')
    with op.batch_alter_table('layer_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_layer_results_job_id'))
    op.drop_table('layer_results')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    # Jobs from before were published when they were submitted.
    op.execute("UPDATE jobs SET enqueued_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
    op.create_table('layer_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('params', sa.Integer(), nullable=False),
    sa.Column('hessian_trace', sa.Float(), nullable=True),
    sa.Column('trace_stderr', sa.Float(), nullable=True),
    sa.Column('hessian_term', sa.Float(), nullable=True),
    sa.Column('interlayer', sa.Float(), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('precision', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'name')
    )
    with op.batch_alter_table('layer_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_layer_results_job_id'), ['job_id'], unique=False)
    op.create_table('search_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('metric', sa.Float(), nullable=False),
    sa.Column('drop', sa.Float(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('accepted', sa.Boolean(), nullable=False),
    sa.Column('chosen', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'position')
    )
    with op.batch_alter_table('search_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_search_steps_job_id'), ['job_id'], unique=False)
