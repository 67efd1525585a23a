"""Readable sentences for pydantic's validation errors, one per problem, shared by the JSON API (422
bodies) and the UI (its error toast), so both say the same thing about the same input."""

from pydantic import ValidationError


def describe_validation_errors(exc_errors) -> list[str]:
    """pydantic/FastAPI errors → short sentences without echoing the (possibly huge) input."""
    sentences = []
    for err in exc_errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") in ("model_attributes_type", "dict_type") and where == "body":
            sentences.append('body must be a JSON object such as {"prompt": "a red fox"}')
        elif err.get("type") == "json_invalid":
            sentences.append("body is not valid JSON")
        elif err.get("type") == "missing":
            sentences.append(f"{where} is required")
        elif err.get("type") == "extra_forbidden":
            sentences.append(f"{where} is not a known field")
        elif msg.startswith(where + " ") or msg.startswith(where.split(".")[-1] + " "):
            sentences.append(msg)
        else:
            sentences.append(f"{where}: {msg}")
    return sentences


def validation_message(exc: ValidationError) -> str:
    """The same sentences the API gives, joined for the UI."""
    return "; ".join(describe_validation_errors(exc.errors()))
