"""Config: one YAML file, validated; every error names the file, the field and the line."""

import textwrap

import pytest

from rayft.cli import main
from rayft.config import ConfigError, load_config


def write(tmp_path, text, data=True):
    if data:
        (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        (tmp_path / "model").mkdir(exist_ok=True)
    p = tmp_path / "run.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """\
base_model:
  path: ./model
adapters:
  - name: a
    r: 8
  - {name: b, variant: dora, target_modules: [q_proj, v_proj], use_rslora: true}
  - {name: c, variant: vera, r: 16}
datasets:
  - {name: d, path: d.jsonl, eval_split: 0.1}
jobs:
  - {adapter: a, dataset: d, epochs: 2, optimizer: {lr: 0.001, schedule: cosine, warmup_steps: 5, loraplus_lr_ratio: 16}}
  - {adapter: b, dataset: d, steps: 10, optimizer: {name: sgd, momentum: 0.9, grad_accumulation: 4}}
  - {adapter: c, dataset: d, steps: 10, max_seq_len: 256, tokens_per_micro_batch: 1024, checkpoint_every: 5}
"""


def test_good_config_loads_with_defaults_and_resolved_paths(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert [j.name for j in cfg.jobs] == ["a", "b", "c"]
    assert cfg.datasets[0].path == (tmp_path / "d.jsonl").resolve()
    assert cfg.base_model.path == str((tmp_path / "model").resolve())
    assert cfg.adapter("a").scale == 2.0 and cfg.adapter("b").scale == pytest.approx(16 / 8**0.5)
    assert cfg.jobs[1].optimizer.grad_accumulation == 4


@pytest.mark.parametrize("edit, expect", [
    (("    r: 8\n", "    r: 8\n    rank: 8\n"), r"run.yaml:6: adapters.0.rank: unknown key"),
    (("    r: 8\n", "    r: -1\n"), r"run.yaml:5: adapters.0.r: Input should be greater than or equal to 1"),
    (("variant: dora", "variant: dorra"), r"run.yaml:6: adapters.1.variant: Input should be 'lora', 'dora' or 'vera'"),
    (("{adapter: a, dataset: d, epochs: 2,", "{adapter: zz, dataset: d, epochs: 2,"), r"jobs.0.adapter: unknown adapter 'zz'"),
    (("{adapter: b, dataset: d, steps: 10,", "{adapter: b, dataset: d, steps: 10, epochs: 1,"),
     r"run.yaml:12: jobs.1: set exactly one of 'epochs' or 'steps'"),
    (("schedule: cosine", "schedule: cosin"), r"run.yaml:11: jobs.0.optimizer.schedule"),
    (("  - {name: c,", "  - {name: a,"), r"adapters.2.name: duplicate name 'a'"),
    (("path: d.jsonl", "path: missing.jsonl"), r"run.yaml:9: datasets.0.path: file not found: .*missing.jsonl"),
    (("max_seq_len: 256", "max_seq_len: 4096"), r"max_seq_len \(4096\) exceeds tokens_per_micro_batch"),
    (("path: ./model", "path: ./nomodel"), r"run.yaml:2: base_model.path: model directory not found"),
    (("{name: c, variant: vera, r: 16}", "{name: c, variant: vera, r: 16, init_from: old/c}"),
     r"run.yaml:7: adapters.2.init_from: no PEFT adapter \(adapter_config.json\) in .*old/c"),
])
def test_bad_configs_name_file_field_and_line(tmp_path, edit, expect):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=expect):
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_validate_command_exit_codes(tmp_path, tiny_model_dir, capsys):
    path = write(tmp_path, GOOD.replace("path: ./model", f"path: {tiny_model_dir}"))
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 20)
    assert main(["validate", str(path)]) == 0
    assert "3 job(s)" in capsys.readouterr().out
    # the data is read as train reads it: one row cannot be split into train and eval
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["validate", str(path)]) == 2
    assert "eval_split=0.1 leaves no training rows of 1" in capsys.readouterr().out
    assert main(["validate", str(write(tmp_path, GOOD.replace("r: 8", "r: x")))]) == 2
    assert "adapters.0.r" in capsys.readouterr().out


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        if path.name.startswith("serve"):
            continue
        load_config(path)
