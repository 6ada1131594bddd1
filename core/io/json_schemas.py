"""The published JSON Schemas (draft 2020-12) of the files avarc writes, generated from the declarations its readers
and writers use: ``python -m avarc.io.json_schemas DIR`` writes ``record.schema.json`` and ``profile.schema.json``
(the repository keeps them in ``schemas/``; a test checks they are current). The JSON that ``bench --json`` and
``tune --json`` print is declared in ``avarc.runs.bench`` and ``avarc.runs.tune``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .profiles import ProfileFile
from .records import RECORD, SCHEMA_VERSION

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict]:
    """File name → schema: one JSONL line of ``classify --out`` and a profile YAML document."""
    record = {"$schema": DRAFT, "title": f"avarc result record (schema {SCHEMA_VERSION})", **RECORD.json_schema()}
    profile = {"$schema": DRAFT, "title": "avarc profile", **ProfileFile.model_json_schema()}
    return {"record.schema.json": record, "profile.schema.json": profile}


def schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def main(folder: str) -> None:
    for name, schema in json_schemas().items():
        (Path(folder) / name).write_text(schema_text(schema), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "schemas")
