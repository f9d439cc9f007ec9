"""The command line: `tinylora train | eval | sweep | count | export | pack | serve`."""


def main(argv: list[str] | None = None) -> int:
    """The `tinylora` entry point. Imported lazily: `tinylora.cli.flags` is used by the study without the commands."""
    from .main import main as run
    return run(argv)
