"""`propd generate`: --compare, prompts from a file, sampling flags (embedded model, short)."""
import pytest

from propd_compile.cli import main

pytestmark = pytest.mark.real_model


def test_generate_compare_reports_identical_outputs(capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert main(["generate", "Name three colours.", "--max-new-tokens", "12", "--compare", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 3  # --threads holds for the command only
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "identical: yes" in out and "speedup" in out and "tok/s" in out


def test_generate_a_batch_from_a_file_with_a_penalty_and_sampling(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\n\nName a fruit.\n")
    assert main(["generate", "--file", str(prompts), "--max-new-tokens", "8", "--repetition-penalty", "1.2",
                 "--compare", "--threads", "1", "--tree", "fixed"]) == 0
    out = capsys.readouterr().out
    assert "[0] " in out and "[1] " in out and "[2] " not in out and "identical: yes" in out
    assert main(["generate", "Say hello.", "--no-chat", "--max-new-tokens", "6", "--temperature", "0.7",
                 "--top-p", "0.9", "--seed", "0", "--compare", "--threads", "1"]) == 0
    assert "identical: n/a (sampling" in capsys.readouterr().out
