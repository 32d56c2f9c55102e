"""Python API: convert with a recipe, then convert again from the recipe the checkpoint recorded.

    python examples/convert_recipe.py MODEL_DIR OUT_DIR --calib wiki.train.txt [--samples 64] [--seq-len 512]

llm-compressor's ``oneshot(model=..., dataset=..., recipe=..., output_dir=...)`` is
``offline.convert_model(model, output_dir, recipe=..., dataset=...)`` here (docs/usage.md, Recipes and the
Python API). The recipe is a dict in this example; a YAML or JSON file, or ``ConvertOptions``, work the
same. The checkpoint records every option it was made with in ``OUT_DIR/haq_recipe.yaml``; converting the
model again with that file into ``OUT_DIR.again`` gives the same files, which this example checks and
prints, then removes the copy.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Hugging Face checkpoint directory (safetensors)")
    ap.add_argument("out", help="output directory (must not exist)")
    ap.add_argument("--calib", required=True, help="calibration source: a text file, hf:ID[:CONFIG], wikitext2, ...")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--method", default="haq")
    args = ap.parse_args(argv)

    from offline import RECIPE_FILE, convert_model

    recipe = {
        "haq_recipe": 1,
        "method": args.method,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "gptq": {"block_size": 128, "dampening": 0.01},
    }
    out = convert_model(args.model, args.out, recipe=recipe, dataset=args.calib)
    recorded = os.path.join(out, RECIPE_FILE)
    print(open(recorded).read(), end="")
    again = convert_model(args.model, out + ".again", recipe=recorded)
    listing = filecmp.dircmp(out, again)  # a checkpoint is one flat directory
    _, differ, unreadable = filecmp.cmpfiles(out, again, listing.common_files, shallow=False)
    identical = not (listing.left_only or listing.right_only or differ or unreadable)
    print(f"{out}: converted again from {recorded}: {'identical' if identical else 'DIFFERENT'} files")
    shutil.rmtree(again)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
