"""Turn a CustomResourceDefinition's openAPIV3Schema into a JSON Schema for check-jsonschema.

    python ops/schemas/crd_to_jsonschema.py CRD.yaml [--version V] [--source TEXT] -o OUT.json

The schemas of ops/schemas/ were made with it from the upstream CRDs that README.md beside
this file names (repository, tag, commit, path, sha256), so they can be made again.

What changes between the two dialects:
- `nullable: true` becomes `"type": [T, "null"]`;
- `x-kubernetes-int-or-string: true` becomes `anyOf: [integer, string]` (unless it is there);
- an object with `properties` and no `additionalProperties` gets `additionalProperties: false`
  unless it says `x-kubernetes-preserve-unknown-fields`: the API server prunes (or, with
  strict field validation, rejects) unknown fields, so a misspelt field is an error here too;
- the other `x-kubernetes-*` keys (CEL rules, list and map types) have no JSON Schema
  meaning and are dropped; so are descriptions (size), unless --keep-descriptions;
- the root pins `apiVersion` and `kind` to the CRD's group/version and kind, and requires
  them with `metadata`.
Needs PyYAML (ops/requirements.txt brings it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Keys of a subschema that hold one subschema, a map of them, or a list of them.
ONE_SCHEMA = ("items", "additionalProperties", "not")
SCHEMA_MAP = ("properties", "patternProperties")
SCHEMA_LIST = ("allOf", "anyOf", "oneOf")
# Keys turned into JSON Schema after the walk (see the module docstring).
HANDLED = ("nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
DROPPED = (
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-embedded-resource",
)


def convert(node: dict[str, Any], *, keep_descriptions: bool = False) -> dict[str, Any]:
    """One openAPIV3Schema node (and all below it) as JSON Schema."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED or (key == "description" and not keep_descriptions):
            continue
        if key in HANDLED:
            continue
        if key in ONE_SCHEMA and isinstance(value, dict):
            out[key] = convert(value, keep_descriptions=keep_descriptions)
        elif key in SCHEMA_MAP:
            out[key] = {
                name: convert(sub, keep_descriptions=keep_descriptions)
                for name, sub in value.items()
            }
        elif key in SCHEMA_LIST:
            out[key] = [convert(sub, keep_descriptions=keep_descriptions) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if out.get("type") == "object" and "properties" in out and not preserve:
        out.setdefault("additionalProperties", False)
    return out


def crd_schema(
    crd: dict[str, Any],
    version: str | None = None,
    *,
    source: str | None = None,
    keep_descriptions: bool = False,
) -> dict[str, Any]:
    """The JSON Schema of one version of a CRD (default: its storage version)."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: kind {crd.get('kind')!r}")
    spec = crd["spec"]
    versions = spec["versions"]
    if version is None:
        chosen = next((v for v in versions if v.get("storage")), versions[0])
    else:
        chosen = next((v for v in versions if v["name"] == version), None)
        if chosen is None:
            names = ", ".join(v["name"] for v in versions)
            raise ValueError(f"no version {version!r} in the CRD (it has {names})")
    schema = convert(chosen["schema"]["openAPIV3Schema"], keep_descriptions=keep_descriptions)
    api_version = f"{spec['group']}/{chosen['name']}"
    kind = spec["names"]["kind"]
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"const": api_version}
    properties["kind"] = {"const": kind}
    required = [name for name in ("apiVersion", "kind", "metadata") if name in properties]
    schema["required"] = required + [n for n in schema.get("required", []) if n not in required]
    header: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": f"{kind} {api_version}",
        "$comment": (
            f"Converted by ops/schemas/crd_to_jsonschema.py from the openAPIV3Schema of CRD "
            f"{crd['metadata']['name']}" + (f" ({source})" if source else "")
        ),
    }
    return header | schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CRD's YAML file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON Schema file")
    parser.add_argument("--version", help="the CRD version (default: the storage version)")
    parser.add_argument("--source", help="where the CRD came from, recorded in $comment")
    parser.add_argument("--keep-descriptions", action="store_true")
    args = parser.parse_args(argv)
    documents = [d for d in yaml.safe_load_all(args.crd.read_text(encoding="utf-8")) if d]
    if len(documents) != 1:
        print(f"error: {args.crd} holds {len(documents)} documents, expected 1", file=sys.stderr)
        return 1
    try:
        schema = crd_schema(
            documents[0],
            args.version,
            source=args.source,
            keep_descriptions=args.keep_descriptions,
        )
    except (KeyError, ValueError) as exc:
        print(f"error: {args.crd}: {exc}", file=sys.stderr)
        return 1
    args.output.write_text(json.dumps(schema, indent=1) + "\n", encoding="utf-8")
    print(f"{args.output}: {schema['title']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
