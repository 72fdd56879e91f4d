"""The stacked-INT8 study (bench/studies/int8_stacked.py): a run that would measure nothing is refused
before anything is written."""

from __future__ import annotations

import pytest

from studies import int8_stacked as study


@pytest.mark.parametrize("extra, reason", [(["--skip-accuracy"], "--skip-accuracy"),
                                           ([], "no dense reference at ")])
def test_nothing_to_measure_is_refused_with_exit_code_2(tmp_path, capsys, extra, reason):
    argv = ["--skip-speed", "--dense", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_:
        study.main(argv)
    assert exit_.value.code == 2
    assert f"error: nothing to measure: --skip-speed, and {reason}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
