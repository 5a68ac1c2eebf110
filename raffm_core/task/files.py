"""Reading a local dataset file (csv, tsv, json, jsonl, parquet) into a ``datasets.Dataset``."""

from __future__ import annotations

import codecs
from pathlib import Path

import datasets

from ..errors import DataError
from .checks import decode_error

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
"""File suffix of a local dataset to the ``datasets`` builder that reads it."""


def read_local_file(path: str, encoding: str = "utf-8", errors: str = "strict") -> datasets.Dataset:
    """The rows of the local file ``path``, read by the builder its suffix names.

    ``encoding`` and ``errors`` (``"strict"`` or ``"replace"``) apply to csv,
    tsv and json files.

    Raises
    ------
    DataError
        If the file is not valid in ``encoding`` (naming the file and the
        run-config keys that fix it).
    """
    builder = LOCAL_FORMATS[Path(path).suffix.lower()]
    kwargs = {"delimiter": "\t"} if Path(path).suffix.lower() == ".tsv" else {}
    if builder in ("csv", "json"):
        codec = encoding
        if builder == "json" and codecs.lookup(encoding).name == "utf-8":
            # datasets' json reader applies encoding_errors only when the
            # encoding is not spelled "utf-8"; "utf_8" is the same codec
            codec = "utf_8" if errors != "strict" else "utf-8"
        kwargs.update(encoding=codec, encoding_errors=errors)
    try:
        if builder == "csv" and errors != "strict":
            # datasets 4.8 drops encoding_errors under pandas >= 3 (its version check
            # reads minor >= 3), so replacing bytes needs pandas' own reader
            import pandas as pd

            frame = pd.read_csv(
                path,
                sep=kwargs.get("delimiter", ","),
                **{k: kwargs[k] for k in ("encoding", "encoding_errors")},
            )
            return datasets.Dataset.from_pandas(frame, preserve_index=False)
        return datasets.load_dataset(
            builder, data_files=path, split="train", keep_in_memory=True, **kwargs
        )
    except Exception as err:
        decode = decode_error(err)
        if decode is None:
            raise
        raise DataError(
            f"dataset file {path} is not valid {encoding} ({decode.reason} at byte "
            f"{decode.start}); set the run-config key dataset-encoding to the file's "
            "encoding (e.g. 'latin-1', 'cp1252'), or dataset-encoding-errors = 'replace' "
            "to replace the undecodable bytes"
        ) from err
