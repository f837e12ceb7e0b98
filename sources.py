"""
TinyStories in any of its layouts, read a chunk at a time so that memory stays flat however large the
data: .txt with <|endoftext|> separators (V2), a .json list of {"story": ...} (V1's
TinyStories_all_data), .jsonl, .parquet (the hub's layout), a directory holding any of these, or the
Hugging Face hub through `datasets`. tinystories.py download normalises what these yield into its
internal form.
"""

import codecs
import itertools
import json
import os
import re
from pathlib import Path

from common import DataError

HUB_DATASET = "roneneldan/TinyStories"
SEPARATOR = "<|endoftext|>"
CHUNK_BYTES = 2**20  # download and pretokenize read this much text at a time
SPLITS = ("train", "val")


def split_of(path):
    """'train', 'val' or None from a file name, e.g. TinyStoriesV2-GPT4-valid.txt,
    validation-00000-of-00001.parquet, train-000.txt."""
    name = Path(path).name.lower()
    if re.search(r"valid|(?<![a-z])val(?![a-z])", name):
        return "val"
    if "train" in name:
        return "train"
    return None


def clean(texts):
    """Stories as the internal form keeps them: stripped, \r\n made \n, empty ones dropped."""
    stories = (t.replace("\r\n", "\n").strip() for t in texts if isinstance(t, str))
    return [s for s in stories if s]


def _read_text(path, chunk_bytes):
    """A file's UTF-8 text in pieces of whole characters: yields (text, bytes read)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            held = len(decoder.getstate()[0])  # bytes of a character the last block cut in two
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not valid UTF-8 (byte {offset - held + e.start})") from None
            if not block:
                return
            offset += len(block)
            yield text, len(block)


def _delimited(pieces, delimiter):
    """Text up to the last `delimiter` read so far (without it), so that no story or line
    is cut in two: yields (text, bytes read), and the rest of the file last."""
    rest = ""
    for text, nbytes in pieces:
        head, _, rest = (rest + text).rpartition(delimiter)
        yield head, nbytes
    yield rest, 0


def _jsonl_rows(pieces):
    """The objects of a .jsonl file, one a line: yields (rows, bytes read). A line that is not JSON is a
    ValueError naming its number."""
    lineno, rest = 0, ""
    for text, nbytes in itertools.chain(pieces, [(None, 0)]):  # None: the end of the file
        lines = (rest + (text or "")).split("\n")
        rest = lines.pop() if text is not None else ""  # a line the text read so far may cut in two
        rows = []
        for line in lines:
            lineno += 1
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {lineno} is not valid JSON ({e.msg})") from None
        yield rows, nbytes


JSON_SPACE = re.compile(r"[ \t\n\r]*")
JSON_EXPECTED = {"[": "'['", ",": "',' or ']'", "": "the end of the file"}


def _json_array(pieces):
    """The elements of a file holding one JSON array (a V1 file: ~100 MB), decoded with
    JSONDecoder.raw_decode as the text arrives: yields (elements, bytes read)."""
    decoder, buf, pos, start = json.JSONDecoder(), "", 0, 0  # start: characters dropped from buf
    expect = "["  # next: "[", "first" (an element or "]"), "element", "," (or "]"), "" (nothing)
    for text, nbytes in itertools.chain(pieces, [(None, 0)]):  # None: the end of the file
        start, buf, pos, elements = start + pos, buf[pos:] + (text or ""), 0, []
        while (pos := JSON_SPACE.match(buf, pos).end()) < len(buf):
            c = buf[pos]
            if expect in ("first", "element"):
                if expect == "first" and c == "]":
                    expect, pos = "", pos + 1
                    continue
                try:
                    element, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    # a cut number, literal or escape fails within the last few characters, a cut
                    # string as unterminated: the text read so far may end inside this element
                    if text is None or (e.pos < len(buf) - 8 and not e.msg.startswith("Unterminated string")):
                        raise ValueError(f"{e.msg} (character {start + e.pos})") from None
                    break
                elements.append(element)
                expect = ","
            elif (expect, c) in (("[", "["), (",", ",")):
                expect, pos = ("first" if c == "[" else "element"), pos + 1
            elif (expect, c) == (",", "]"):
                expect, pos = "", pos + 1
            else:
                raise ValueError(f"expected {JSON_EXPECTED[expect]} at character {start + pos}, not {c!r}")
        yield elements, nbytes
    if expect:
        raise ValueError("the file ends inside the JSON array")


def _parquet_texts(path, chunk_bytes):
    """The `text` (or `story`) column of a .parquet file (the hub's layout), about
    chunk_bytes of text a batch: yields (texts, bytes of the file)."""
    import pyarrow.parquet as pq

    # buffer_size: read a column chunk (up to a whole row group) a piece at a time
    with pq.ParquetFile(path, buffer_size=chunk_bytes, pre_buffer=False) as pf:
        column = "text" if "text" in pf.schema_arrow.names else "story"
        meta, file_bytes = pf.metadata, os.path.getsize(path)
        text_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        batch_rows = max(1, chunk_bytes * meta.num_rows // max(1, text_bytes))
        rows, read = 0, 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            rows += batch.num_rows
            upto = file_bytes * rows // meta.num_rows
            yield batch.column(0).to_pylist(), upto - read
            read = upto


def read_file(path, chunk_bytes=CHUNK_BYTES):
    """The stories of one file, a chunk of about chunk_bytes at a time: yields (stories,
    bytes of the file they came from). A file is .txt with <|endoftext|> separators, a .json
    list of {"story": ...} (V1 TinyStories_all_data), .jsonl, or .parquet (the hub's layout)."""
    suffix, found = Path(path).suffix, False
    try:
        if suffix == ".parquet":
            texts = _parquet_texts(path, chunk_bytes)
        elif suffix == ".txt":
            texts = ((t.split(SEPARATOR), n) for t, n in _delimited(_read_text(path, chunk_bytes), SEPARATOR))
        else:
            rows = (_json_array if suffix == ".json" else _jsonl_rows)(_read_text(path, chunk_bytes))
            texts = (([r.get("story", r.get("text")) for r in rs], n) for rs, n in rows)
        for t, nbytes in texts:
            stories = clean(t)
            found = found or bool(stories)
            yield stories, nbytes
    except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
        raise DataError(f"cannot read stories from {path}: {e}") from None
    if not found:
        raise DataError(f"{path} holds no stories")


def read_stories(path):
    """All the stories of one file, as a list (download and pretokenize stream instead)."""
    return [s for stories, _ in read_file(path) for s in stories]


def read_files(paths, chunk_bytes=CHUNK_BYTES):
    """read_file over several files, one after another."""
    return itertools.chain.from_iterable(read_file(p, chunk_bytes) for p in paths)


def local_files(source):
    """{'train': [paths], 'val': [paths]} of a directory holding the dataset in one of its
    layouts. Files are assigned to splits by name; if no name says, the first file (in
    sorted order) is validation and the rest train, as llama2.c does with data00.json."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"source directory {source} does not exist")
    files = sorted(p for ext in ("txt", "json", "jsonl", "parquet") for p in source.rglob(f"*.{ext}"))
    if not files:
        raise DataError(f"no .txt, .json, .jsonl or .parquet files in {source}")
    splits = [split_of(f) for f in files]
    if all(s is None for s in splits):
        splits = ["val"] + ["train"] * (len(files) - 1)
    unknown = [f.name for f, s in zip(files, splits) if s is None]
    if unknown:
        raise DataError(f"cannot tell the split (train or valid) of {', '.join(unknown)} in {source}")
    data = {s: [f for f, fs in zip(files, splits) if fs == s] for s in SPLITS}
    for s in SPLITS:
        if not data[s]:
            raise DataError(f"no {s} stories in {source}")
    return data


def hub_chunks(chunk_bytes):
    """(total bytes, {split: chunks}) of the dataset on the Hugging Face hub. `datasets`
    keeps it as memory-mapped Arrow files in its cache; it is read a batch at a time."""
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET)
        splits = {"train": ds["train"], "val": ds["validation"]}
    except Exception as e:
        raise DataError(
            f"could not get {HUB_DATASET} from the Hugging Face hub ({type(e).__name__}); "
            f"point --source=DIR or TINYSTORIES_DIR at a local copy"
        ) from None

    def chunks(split):
        rows = max(1, chunk_bytes * len(split) // max(1, split.data.nbytes))
        for batch in split.with_format("arrow").iter(batch_size=rows):
            yield clean(batch.column("text").to_pylist()), batch.nbytes

    return sum(s.data.nbytes for s in splits.values()), {name: chunks(s) for name, s in splits.items()}
