"""`components.config_check`: a misspelled key or a component that does not exist stops a run
before any work, naming the key and the closest valid one; every shipped config passes."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from components.config_check import (
    ConfigCheckError,
    check_recipe_config,
    components,
    config_file_from_argv,
    config_problems,
    missing_data_paths,
    recipe_keys,
)
from tests.helpers import REPO_ROOT, run_cli
from tests.test_configs import CONFIGS, recipe_file, run_lines

#: (config, recipe file) for every `tune run` line of every config's header.
PAIRS = sorted({(config, recipe_file(recipe)) for config in CONFIGS for _, recipe, _ in run_lines(config)})


def pair_id(pair) -> str:
    config, recipe = pair
    return f"{config.relative_to(REPO_ROOT / 'configs').as_posix()}-{recipe.stem}"


def typo(name: str) -> str:
    """``name`` with its middle letter doubled: a misspelling whose closest valid name is ``name``."""
    middle = len(name) // 2
    return name[:middle] + name[middle] + name[middle:]


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_every_shipped_config_passes_for_every_recipe_that_runs_it(pair):
    config, recipe = pair
    check_recipe_config(OmegaConf.load(config), recipe, config_file=str(config))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_each_misspelled_top_level_key_is_named_with_the_right_suggestion(pair):
    config, recipe = pair
    original = OmegaConf.load(config)
    for key in original:
        cfg = OmegaConf.load(config)
        cfg[typo(key)] = cfg.pop(key)
        with pytest.raises(ConfigCheckError) as caught:
            check_recipe_config(cfg, recipe, config_file=str(config))
        expected = f"{config}: unknown key {typo(key)!r} (did you mean {key!r}?): {recipe.name} does not read it"
        assert expected in str(caught.value), str(caught.value)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_each_misspelled_component_argument_and_path_is_named(pair):
    config, recipe = pair
    for where, node in components(OmegaConf.load(config)):
        for key in [k for k in node if k != "_component_"]:
            cfg = OmegaConf.load(config)
            target = OmegaConf.select(cfg, where)
            target[typo(key)] = target.pop(key)
            problems = config_problems(cfg, recipe)
            assert any(
                p.startswith(f"{where}.{typo(key)}: ") and f"(did you mean {key!r}?)" in p for p in problems
            ), f"{where}.{typo(key)} not caught: {problems}"
        cfg = OmegaConf.load(config)
        path = OmegaConf.select(cfg, where)["_component_"]
        module, _, name = path.rpartition(".")
        OmegaConf.select(cfg, where)["_component_"] = f"{module}.{typo(name)}"
        problems = config_problems(cfg, recipe)
        assert f"{where}._component_: '{module}.{typo(name)}' does not exist: no {typo(name)!r} in {module} (did you mean {name!r}?)" in problems


def test_all_problems_are_reported_at_once(tmp_path):
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "lora.yaml")
    cfg.optimiser = cfg.pop("optimizer")
    cfg.dataset.templte = cfg.dataset.pop("template")  # the builder takes **kwargs: still caught
    cfg.model._component_ = "components.modles.lora_tiny_llama3_2"
    cfg.lr_scheduler.num_warmup_step = 0
    config = tmp_path / "lora.yaml"
    OmegaConf.save(cfg, config)
    with pytest.raises(ConfigCheckError) as caught:
        check_recipe_config(cfg, REPO_ROOT / "recipes" / "lora_finetune_single_device.py", config_file=str(config))
    assert isinstance(caught.value, ValueError)
    assert caught.value.problems == [
        "unknown key 'optimiser' (did you mean 'optimizer'?): lora_finetune_single_device.py does not read it",
        "model._component_: 'components.modles.lora_tiny_llama3_2' does not exist: no 'modles' in components (did you mean 'models'?)",
        "dataset.templte: components.data.medical_meadow_mixture has no argument 'templte' (did you mean 'template'?); "
        "it would go to **load_dataset_kwargs",
        "lr_scheduler.num_warmup_step: transformers.get_linear_schedule_with_warmup has no argument 'num_warmup_step' "
        "(did you mean 'num_warmup_steps'?)",
    ]
    assert str(caught.value).splitlines()[0].startswith(f"{config}: unknown key 'optimiser'")


def test_nested_components_and_import_failures_are_checked():
    cfg = OmegaConf.create(
        {
            "output_dir": "/tmp/x",
            "model": {"_component_": "torch.nn.Linear", "in_features": 2, "out_featres": 3},
            "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dri": "${output_dir}"},
            "loss": {"_component_": "torchh.nn.MSELoss"},
            "dataset": [{"_component_": "torch.nn.Identity", "inner": {"_component_": "torch.nn.Dropout", "pp": 0.1}}],
        }
    )
    problems = config_problems(cfg, REPO_ROOT / "recipes" / "lora_finetune_single_device.py")
    assert len(problems) == 4
    assert "model.out_featres: torch.nn.Linear has no argument 'out_featres' (did you mean 'out_features'?)" in problems
    assert any(p.startswith("metric_logger.log_dri: ") and "(did you mean 'log_dir'?)" in p for p in problems)
    assert "loss._component_: 'torchh.nn.MSELoss' does not exist: no module 'torchh' (did you mean 'torch'?)" in problems
    assert "dataset[0].inner.pp: torch.nn.Dropout has no argument 'pp' (did you mean 'p'?)" in problems


def test_recipe_keys_follow_aliases_methods_and_constants(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "from torchtune.training import PROFILER_KEY\n"
        "STEPS = 'max_steps'\n"
        "class R:\n"
        "    def __init__(self, cfg):\n"
        "        self.a = cfg.alpha\n"
        "        self.b = cfg.get('beta', 1)\n"
        "        self.c = cfg['gamma']\n"
        "        self.d = cfg.get(STEPS)\n"
        "        self.p = cfg.get(PROFILER_KEY, None)\n"
        "        if 'delta' in cfg:\n"
        "            pass\n"
        "        conf = cfg\n"
        "        conf.epsilon\n"
        "        cfg.items()\n"
        "        other.zeta\n"
        "    def setup(self, cfg_model):\n"
        "        cfg_model.not_top_level\n"
    )
    assert recipe_keys(str(recipe)) == {"alpha", "beta", "gamma", "max_steps", "profiler", "delta", "epsilon"}


def test_interpolated_and_common_keys_are_known():
    cfg = OmegaConf.create({"base": "/data", "output_dir": "${base}/run", "resume_from_checkpoint": False})
    assert config_problems(cfg, REPO_ROOT / "recipes" / "eleuther_eval.py") == []
    cfg.loss = {"_component_": "torch.nn.MSELoss"}
    assert config_problems(cfg, REPO_ROOT / "recipes" / "eleuther_eval.py") == [
        "unknown key 'loss': eleuther_eval.py does not read it"
    ]


def test_config_file_comes_from_the_tune_command_line():
    assert config_file_from_argv(["recipes/eleuther_eval.py", "--config", "configs/tiny/eval.yaml", "limit=3"]) == "configs/tiny/eval.yaml"
    assert config_file_from_argv(["x.py", "--config=c.yaml"]) == "c.yaml"
    assert config_file_from_argv(["x.py"]) is None


def test_a_key_the_file_interpolates_stays_known_when_an_override_replaces_the_interpolation():
    """configs/tiny/knowtuning_kc.yaml reads stage 1's model from ${stage1_dir}/epoch_2; pointing
    checkpointer.checkpoint_dir elsewhere on the command line leaves stage1_dir unread, not unknown."""
    config = "configs/tiny/knowtuning_kc.yaml"
    recipe = REPO_ROOT / "recipes" / "knowtuning_dpo_single_device.py"
    cfg = OmegaConf.merge(OmegaConf.load(REPO_ROOT / config), OmegaConf.from_dotlist(["checkpointer.checkpoint_dir=/x"]))
    assert "stage1_dir" in cfg and "${stage1_dir}" not in OmegaConf.to_yaml(cfg)
    check_recipe_config(cfg, recipe, config_file=str(REPO_ROOT / config))
    cfg["stage1_dri"] = "/y"
    with pytest.raises(ConfigCheckError, match="unknown key 'stage1_dri' \\(did you mean 'stage1_dir'\\?\\)"):
        check_recipe_config(cfg, recipe, config_file=str(REPO_ROOT / config))


#: Every recipe `tune run` can start, with a tiny config it runs and a key that config sets.
CLI_CASES = [
    ("eleuther_eval", "configs/tiny/eval.yaml", "limit"),
    ("full_finetune_single_device", "configs/tiny/full_sft.yaml", "epochs"),
    ("full_finetune_distributed", "configs/tiny/full_sft.yaml", "epochs"),
    ("lora_finetune_single_device", "configs/tiny/lora.yaml", "epochs"),
    ("lora_finetune_distributed", "configs/tiny/qlora.yaml", "epochs"),
    ("galore_finetune_single_device", "configs/tiny/galore_layerwise.yaml", "epochs"),
    ("knowtuning_dpo_single_device", "configs/tiny/knowtuning_kc.yaml", "epochs"),
]


@pytest.mark.parametrize("recipe, config, key", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_tune_run_stops_before_any_work_naming_the_key_and_the_closest_one(recipe, config, key, tmp_path):
    """Through the real CLI, for every recipe: a misspelled override and a component that does
    not exist stop `tune run` before it logs its config, loads a model or writes anything."""
    output_dir = tmp_path / "run"
    proc = run_cli(
        "tune",
        ["run", f"recipes/{recipe}.py", "--config", config, f"{typo(key)}=3",
         "model._component_=components.models.tiny_llama3_3", f"output_dir={output_dir}"],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        f"{config}: unknown key {typo(key)!r} (did you mean {key!r}?): {recipe}.py does not read it, "
        "set on the command line" in proc.stderr
    ), proc.stderr[-3000:]
    assert (
        f"{config}: model._component_: 'components.models.tiny_llama3_3' does not exist: "
        "no 'tiny_llama3_3' in components.models (did you mean 'tiny_llama3_2'?)" in proc.stderr
    )
    assert "Running " not in proc.stdout + proc.stderr  # stopped before config.log_config
    assert not output_dir.exists()


def test_the_study_file_names_a_misspelled_key_with_the_closest_one(tmp_path):
    from components.study.spec import StudyError, load_study

    study = Path(tmp_path / "study.yaml")
    study.write_text("name: s\nrunz: {}\n")
    with pytest.raises(StudyError, match=r"study.yaml: unknown key 'runz'; did you mean 'runs'\?"):
        load_study(str(study))


def test_an_unknown_template_is_named_with_the_templates_and_the_closest():
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "lora.yaml")
    cfg.dataset.template = "llama3chat"
    problems = config_problems(cfg, REPO_ROOT / "recipes" / "lora_finetune_single_device.py")
    assert problems == [
        "dataset.template: unknown template 'llama3chat' (did you mean 'llama3_chat'?); "
        "the templates are medalpaca, alpaca, llama3_chat"
    ]


def test_missing_data_paths_names_each_key_and_path(tmp_path, monkeypatch):
    """Every local data path of the dataset section: data_dir, a local source's data_files, the
    decontamination files; a hub source's data_files are not local paths; relative ones resolve
    from the current directory, and outside the repository root the line says so."""
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "full_sft.yaml")
    assert missing_data_paths(cfg) == []
    monkeypatch.chdir(tmp_path)
    assert missing_data_paths(cfg) == [
        f"dataset.{key}: {path}: no such file or folder (relative paths are read from the current directory "
        f"{tmp_path.resolve()}; the shipped configs' paths are relative to the repository root {REPO_ROOT}: "
        "run from there, or give absolute paths)"
        for key, path in (("data_dir", "components/data/sample/medical_meadow"), ("decontaminate.usmle", "components/data/sample/usmle"))
    ]
    local = OmegaConf.create({"dataset": {"_component_": "components.data.medical_meadow_dataset", "source": "json", "data_files": [str(tmp_path / "a.jsonl")]}})
    assert missing_data_paths(local) == [f"dataset.data_files: {tmp_path / 'a.jsonl'}: no such file or folder"]
    local.dataset.source = "medalpaca/medical_meadow_wikidoc"
    assert missing_data_paths(local) == []
