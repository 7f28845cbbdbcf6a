"""``statelab tokenizer train CORPUS --vocab N -o OUT.tiktoken`` and ``statelab tokenizer list``."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = sub.add_parser("train", help="train byte-level BPE ranks on a UTF-8 corpus",
                       description="Train byte-level BPE on a UTF-8 text file and write .tiktoken ranks; use them with "
                                   "`tokenizer: {kind: bpe, path: OUT.tiktoken}`.")
    t.add_argument("corpus", help="UTF-8 text file")
    t.add_argument("--vocab", type=int, required=True, help="vocabulary size (at least 256: the bytes, then merges)")
    t.add_argument("-o", "--output", required=True, help="ranks file to write (.tiktoken)")
    t.add_argument("--fraction", type=float, default=1.0,
                   help="train on the first FRACTION of the text (0.9: the training split of val_fraction 0.1)")
    sub.add_parser("list", help="list the bundled BPE encodings")
    parser.set_defaults(_tokenizer_parser=parser)


def run(args) -> int:
    action = getattr(args, "tokenizer_command", None)
    if action == "list":
        return _list()
    if action == "train":
        return _train(args)
    args._tokenizer_parser.print_help()
    return 2


def _list() -> int:
    from statelab.tokenizers import bundled_encodings, load_bpe

    table = bundled_encodings()
    if not table:
        print("no bundled BPE encodings")
        return 0
    for name, path in table.items():
        tok = load_bpe(name=name)
        print(f"{name:<24} vocabulary {tok.vocab_size:>7}   {path}")
    print("\nuse one with `tokenizer: {kind: bpe, name: NAME}`, or any local file with `{kind: bpe, path: FILE}`")
    return 0


def _train(args) -> int:
    import time

    from statelab.data.base import DataError
    from statelab.data.text import read_corpus
    from statelab.tokenizers import BPETokenizer, TokenizerError, save_ranks, train_bpe

    if not 0 < args.fraction <= 1:
        print("statelab tokenizer train: --fraction must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        text = read_corpus(args.corpus).text
        text = text[: int(len(text) * args.fraction)]
        t0 = time.perf_counter()
        ranks = train_bpe(text, args.vocab)
    except (DataError, TokenizerError) as exc:
        print(f"statelab tokenizer train: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    save_ranks(ranks, args.output)
    tok = BPETokenizer(ranks)
    n = len(tok.encode_array(text))
    note = "" if len(ranks) == args.vocab else f" (stopped early: no pair occurs twice; asked for {args.vocab})"
    print(f"wrote {args.output}: vocabulary {len(ranks)}{note}, trained on {len(text):,} characters in {seconds:.1f}s; "
          f"{len(text.encode('utf-8')) / n:.2f} bytes per token on that text")
    return 0
