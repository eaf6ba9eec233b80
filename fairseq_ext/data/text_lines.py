"""Reading text files line by line as fairseq and Python do, refusing what would misalign them.

Python's text files and fairseq-preprocess end a line at ``\\n``, ``\\r\\n`` and a lone ``\\r``; ``wc -l``
counts only ``\\n``.  A lone ``\\r`` inside a line therefore makes the tools see one line more than a shell
check does (401 against 400), and a parallel pair is misaligned from that line on.  ``\\n`` and ``\\r\\n``
line ends are accepted.  The other separators of ``str.splitlines`` (``\\v``, ``\\f``, ``\\x1c-\\x1e``,
``\\x85``, ``\\u2028``, ``\\u2029``) end no line for these tools (fairseq's tokenizer reads them as spaces), so
they are accepted too.

This module imports nothing but the standard library: the recipes' helper script loads it by path,
without importing fairseq.
"""


class TextLineError(ValueError):
    """A text file the tools would not read line for line as ``wc -l`` does; the message names file and line."""


def read_text_lines(path: str):
    """Yields (1-based line number, line without its end) of a UTF-8 text file; raises TextLineError
    naming the file and line for bytes that are not UTF-8 and for a carriage return inside a line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            try:
                line = body.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TextLineError(
                    f"{path}:{number}: not UTF-8 (byte {body[err.start:err.start + 1]!r} at byte {err.start + 1} of the "
                    "line); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if "\r" in line:
                raise TextLineError(
                    f"{path}:{number}: a carriage return (\\r) inside the line at column {line.index(chr(13)) + 1}; "
                    "Python and fairseq-preprocess would split the line there, so the files would lose their "
                    "alignment: remove it (e.g. tr -d '\\r')"
                )
            yield number, line
