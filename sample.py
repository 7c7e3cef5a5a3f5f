"""Generate images of the person in a face photo from a prompt containing "f l".

    python sample.py --image face.jpg --prompt "f l eating bread in front of the Eiffel Tower" --out out.png

Not implemented yet: it lands with the sampling issue (#4). Today `python -m f2d_jax.demo`
runs the conditioning half of the pipeline (face -> "f l" tokens -> text embeddings).
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="photo of the person")
    parser.add_argument("--prompt", required=True, help='prompt containing the identifier "f l"')
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--config", default="configs/f2d_sd14.py", help="config file (default: %(default)s)")
    parser.parse_args(argv)
    print("sample.py: sampling is not implemented yet (issue #4: the JAX pipeline, schedulers, sample.py). "
          "Missing: f2d_jax.sampling. `python -m f2d_jax.demo` runs the conditioning part today.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
