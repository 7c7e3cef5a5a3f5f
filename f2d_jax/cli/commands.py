"""The console scripts (pyproject.toml's [project.scripts]). Each imports its command's module inside
`command`, so that a Ctrl-C while the modules load is one line and status 130 as well."""
import importlib

from f2d_jax.cli import command


def _script(module: str):
    @command
    def main(argv=None) -> int:
        return importlib.import_module(module).main(argv)
    return main


train = _script("f2d_jax.cli.train")
sample = _script("f2d_jax.cli.sample")
app = _script("f2d_jax.cli.app")
convert = _script("f2d_jax.convert.__main__")
evaluate = _script("f2d_jax.eval.__main__")
prepare = _script("f2d_jax.data.prepare")
identities = _script("f2d_jax.data.identities")
verify = _script("f2d_jax.pretrain.verify")
demo = _script("f2d_jax.demo")
