"""``statelab memory``: per-user live memory from the command line.

    statelab memory ingest --user U --model CKPT FILES... [--incognito]
    statelab memory query  --user U --model CKPT "prompt" [--max-new-tokens N] [--incognito]
    statelab memory wipe   --user U
    statelab memory serve  --model CKPT [--port 8765] [--max-batch 16]   (HTTP on loopback; then-memory[serve])
    statelab memory list
    statelab memory corpus --out FILE [--docs N] [--lengths 512 1024 2048]
    statelab memory facts  --out FILE [--docs N] [--seed S]      (fact/question training text)

``--root DIR`` (every command) is the users' directory; default ``$STATELAB_MEMORY_ROOT`` or
``~/.local/share/statelab/users``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="memory_command", metavar="ACTION")

    def common(p: argparse.ArgumentParser, user: bool = True) -> None:
        p.add_argument("--root", default=None, help="users' directory (default $STATELAB_MEMORY_ROOT or "
                       "~/.local/share/statelab/users)")
        if user:
            p.add_argument("--user", required=True, help="user id: lowercase letters, digits, '.', '_', '-'")

    def model(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="checkpoint (or run directory) of a model with a 'then' memory")
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        p.add_argument("--incognito", action="store_true", help="read the user's memory but write nothing")
        p.add_argument("--segment-len", type=int, default=256, help="tokens per forward pass")
        p.add_argument("--coarse-lists", type=int, default=0, metavar="N",
                       help="k-means lists of the trace store's coarse index (cold chunks are laid out by list and "
                            "the index is retrained as the store doubles); 0 = exact search (default)")
        p.add_argument("--nprobe", type=int, default=32, help="lists each query reads with --coarse-lists")
        p.add_argument("--durable", action="store_true",
                       help="fsync the trace log on every write (survives a power loss, not only a killed process)")

    p = sub.add_parser("ingest", help="read files into a user's memory (the model stays frozen)")
    common(p)
    model(p)
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p = sub.add_parser("query", help="answer a prompt from a user's memory (greedy)")
    common(p)
    model(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p = sub.add_parser("serve", help="serve many users from one frozen model over HTTP on loopback "
                       "(needs then-memory[serve])")
    common(p, user=False)
    model(p)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (127.0.0.1, ::1, localhost)")
    p.add_argument("--port", type=int, default=8765, help="TCP port")
    p.add_argument("--max-batch", type=int, default=16, help="most users' queries in one batched generation")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the first query of a batch waits for others (milliseconds)")
    p = sub.add_parser("wipe", help="remove everything of a user")
    common(p)
    p = sub.add_parser("list", help="list the users with a memory")
    common(p, user=False)
    p = sub.add_parser("facts", help="write fact/question training text (varied templates, updates, preferences, "
                       "Tiny Shakespeare filler; training templates only)")
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--docs", type=int, default=6000, help="documents")
    p.add_argument("--seed", type=int, default=0, help="random seed (the text is a pure function of it)")
    p.add_argument("--update-p", type=float, default=0.3, help="chance that a document updates one of its facts")
    p = sub.add_parser("corpus", help="write Tiny Shakespeare interleaved with passkey documents (stateful pretraining)")
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--docs", type=int, default=400, help="passkey documents")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="document lengths (chars)")
    p.add_argument("--digits", type=int, default=5, help="digits of each key")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--min-gap", type=int, default=None,
                   help="characters of Shakespeare between documents (default: the longest document); at least the "
                        "memory's ring_size, so no question sees an earlier document's key")


def _service(args):
    import statelab
    from then_memory.users import MemoryService, StoreConfig

    if args.coarse_lists < 0 or args.nprobe < 1:
        raise ValueError("--coarse-lists must be >= 0 and --nprobe >= 1")
    model = statelab.load(args.model, map_location=args.device)
    store = StoreConfig(coarse_lists=args.coarse_lists, nprobe=args.nprobe, durable=args.durable)
    return MemoryService(model, args.root, segment_len=args.segment_len, store=store)


def run(args: argparse.Namespace) -> int:
    from then_memory.users import UserIdError, validate_user_id

    action = getattr(args, "memory_command", None)
    if action is None:
        print("statelab memory: give an action: ingest, query, wipe or list (see statelab memory -h)", file=sys.stderr)
        return 2
    try:
        if getattr(args, "user", None) is not None:
            validate_user_id(args.user)
        if action == "corpus":
            from then_memory.corpus import make_passkey_corpus

            print(json.dumps(make_passkey_corpus(args.out, docs=args.docs, lengths=args.lengths, digits=args.digits,
                                                 seed=args.seed, min_gap=args.min_gap)))
            return 0
        if action == "facts":
            from statelab.io import atomic_write_text

            from then_memory.facts import fact_corpus

            text = fact_corpus(args.docs, seed=args.seed, update_p=args.update_p)
            atomic_write_text(args.out, text)
            print(json.dumps({"out": args.out, "docs": args.docs, "chars": len(text)}))
            return 0
        if action == "list":
            from then_memory.users import UserDirectories

            print("\n".join(UserDirectories(args.root).users()))
            return 0
        if action == "wipe":
            from then_memory.users import UserDirectories

            existed = UserDirectories(args.root).wipe(args.user)  # wiping needs no model
            print(f"wiped {args.user}" if existed else f"{args.user}: no memory to wipe")
            return 0
        if action == "ingest":
            missing = [f for f in args.files if not Path(f).is_file()]
            if missing:
                print(f"statelab memory ingest: no such file: {', '.join(missing)}", file=sys.stderr)
                return 2
            stats = _service(args).ingest(args.user, [Path(f) for f in args.files], incognito=args.incognito)
            print(json.dumps({"user": args.user, "incognito": args.incognito, **stats}))
            return 0
        if action == "serve":
            from then_memory.serve import check_loopback, serve

            check_loopback(args.host)
            if args.incognito:
                raise ValueError("serve: incognito is per request ({\"incognito\": true}), not a server flag")
            serve(_service(args), host=args.host, port=args.port, max_batch=args.max_batch,
                  batch_wait_s=args.batch_wait_ms / 1000)
            return 0
        if action == "query":
            print(_service(args).query(args.user, args.prompt, max_new_tokens=args.max_new_tokens,
                                       incognito=args.incognito))
            return 0
    except (UserIdError, ValueError, RuntimeError) as exc:
        print(f"statelab memory {action}: {exc}", file=sys.stderr)
        return 2
    return 2
