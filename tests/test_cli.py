"""The `m3jax` command line: subcommands that hand their arguments to their own parsers."""

import pytest

from m3jax import cli


@pytest.mark.parametrize("sub,module,fn", [("eval", "m3jax.eval", "eval_main"),
                                           ("convert", "m3jax.convert", "convert_main")])
def test_delegating_subcommands_get_every_argument(monkeypatch, sub, module, fn):
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(module), fn, lambda argv: seen.append(list(argv)) or 0)
    argvs = [["--checkpoint", "X", "--bank", "Y", "--n-ppl", "3"], ["X", "--modes", "none"], ["--help"], []]
    for argv in argvs:
        assert cli.main([sub] + argv) == 0
    assert seen == argvs  # in order, leading options included (argparse's REMAINDER drops them)


def test_help_of_delegating_subcommands_and_unknown_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["presets", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
