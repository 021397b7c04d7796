"""Values handed from one step to the next: `nbflow.glue` and `nbflow.load_value`.

Owns: writing a published value to `_nbflow/values/<name>` (DataFrames as
Parquet, JSON-able values as JSON, anything else pickled) and reading it back,
plus a scrapbook-compatible display output so `scrapbook.read_notebook` still
sees the scrap. An instance of a parameter grid writes its own file under its
partition folders, and a consumer reads the values of every instance as one
DataFrame. Runs inside the kernel; imports pandas only for DataFrames.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .layout import value_file

SCRAP_MIME = "application/scrapbook.scrap.json+json"


def glue(name: str, value: Any, display: bool = False) -> None:
    """Publish `value` under `name` for downstream steps that `consumes` it.

    Inside an nbflow run the value is written to the pipeline's value store;
    run by hand, the value is only recorded in the notebook (as scrapbook does).
    """
    if not name.isidentifier():
        raise ValueError(f"value name {name!r} must be an identifier")
    folder = os.environ.get("NBFLOW_VALUES_DIR")
    reference = None
    if folder:
        path = value_file(Path(folder), name, os.environ.get("NBFLOW_GRID_PARTITION", ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            kind = _write(value, Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        reference = {"nbflow_value": name, "format": kind}
    _record_scrap(name, value, reference, display)


def _write(value: Any, path: Path) -> str:
    if _is_dataframe(value):
        value.to_parquet(path)
        return "parquet"
    try:
        data = json.dumps(value)
    except (TypeError, ValueError):
        with open(path, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        return "pickle"
    path.write_text(data, encoding="utf-8")
    return "json"


def load_value(path: str | os.PathLike, grid: Sequence[Mapping[str, Any]] | None = None) -> Any:
    """Read a value written by `glue` (the format is recognised from the file).

    With `grid` (the values of each instance of the gridded step that
    published it), `path` is the value's folder and the result is one pandas
    DataFrame: the instances' DataFrames concatenated with the grid keys as
    columns (as a partitioned Parquet read gives them), or for any other
    value one row per instance, the grid keys then a column named after the value.
    """
    if grid is not None:
        return _load_grid(Path(path), grid)
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        import pandas as pd  # noqa: PLC0415

        return pd.read_parquet(path)
    if head[:1] == b"\x80":
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - written by the pipeline's own upstream step
    return json.loads(path.read_text(encoding="utf-8"))


def _load_grid(folder: Path, grid: Sequence[Mapping[str, Any]]) -> Any:
    import pandas as pd  # noqa: PLC0415

    from .grid import partition  # noqa: PLC0415

    name = folder.name.removesuffix(".grid")
    loaded = [(values, load_value(value_file(folder.parent, name, partition(values.items())))) for values in grid]
    if loaded and all(_is_dataframe(value) for _, value in loaded):
        for values, frame in loaded:
            clash = [key for key in values if key in frame.columns]
            if clash:
                raise ValueError(f"the DataFrame published as {name!r} has a column {clash[0]!r}, which is also a "
                                 "grid key; rename the column")
        return pd.concat([frame.assign(**values) for values, frame in loaded], ignore_index=True)
    return pd.DataFrame([{**values, name: value} for values, value in loaded],
                        columns=[*(grid[0] if grid else {}), name])


def _is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "to_parquet")


def _record_scrap(name: str, value: Any, reference: dict | None, display: bool) -> None:
    try:
        from IPython import get_ipython  # noqa: PLC0415
        from IPython.display import display as show  # noqa: PLC0415
    except ImportError:
        return
    if get_ipython() is None:
        return
    data: Any = reference
    if not _is_dataframe(value):
        try:
            json.dumps(value)
            data = value
        except (TypeError, ValueError):
            pass
    if data is None:
        data = {"nbflow_value": name, "format": "pickle", "repr": repr(value)[:200]}
    payload = {SCRAP_MIME: {"name": name, "data": data, "encoder": "json", "version": 1}}
    show(payload, metadata={"scrapbook": {"name": name, "data": True, "display": False}}, raw=True)
    if display:
        show(value)
