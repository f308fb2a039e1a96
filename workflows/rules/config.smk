# Checking the configuration: every error is one line naming where it is (and, for a
# misspelt key, the key meant), and the run stops before any rule is planned.

import difflib
import json
import sys


def _config_error(error):
    """One line for a jsonschema error: where, what, and a suggestion for a typo."""
    where = ".".join(str(p) for p in error.absolute_path) or "the top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in known]
        if unknown and known:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            return (f"unknown key {', '.join(hints)} under {where}; "
                    f"known keys: {', '.join(known)}")
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {' '.join(str(error.message).split())}"


def check_config(cfg, schema_path):
    """Stop with 'config error: ...' (one line, exit 1) when cfg breaks the schema."""
    from jsonschema import Draft202012Validator

    schema = json.loads(Path(schema_path).read_text())
    errors = sorted(Draft202012Validator(schema).iter_errors(cfg),
                    key=lambda e: (e.validator != "additionalProperties", len(e.absolute_path),
                                   list(map(str, e.absolute_path))))
    if errors:
        print(f"config error: {_config_error(errors[0])}", file=sys.stderr)
        sys.exit(1)
