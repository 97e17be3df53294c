"""/v1/models: what can be compressed without a hub (the builtins) and the SOURCE forms."""

from __future__ import annotations

from fastapi import APIRouter

from worker.engine.catalogue import BUILTIN_DESCRIPTIONS

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
async def list_models() -> dict:
    return {
        "builtin": [{"name": name, "source": f"builtin:{name}", "description": text}
                    for name, text in BUILTIN_DESCRIPTIONS.items()],
        "sources": ["hf:<repo_id>[@revision]", "local:<dir under MIXQ_MODEL_ROOT>", "builtin:<name>"],
    }
