"""lm-eval tasks named by `alfred-train eval --tasks` and `ppo.eval_tasks`, checked before any weight is read.

A task is a name from lm-eval's registry or a task YAML file; a file's folder is registered with
lm-eval's TaskManager, which indexes every *.yaml below it by its `task:` name. Checks, cheapest first:

- `check_tasks` (every config load): lm-eval is installed, at least one task, each file exists and
  names a task and its dataset.
- `check_task_names` (the dry run, once before PPO trains, and `eval`): each file builds lm-eval's
  TaskConfig (a misspelt key, an unknown output_type), its local data files exist and parse as
  JSON, no other file under the registered folders takes its name (lm-eval scored the first one it
  found, silently), and lm-eval knows every name.
A config the dry run calls valid used to train for hours and then fail in lm-eval's traceback.
"""

from __future__ import annotations

from pathlib import Path

from alfred_train.errors import ConfigError

INSTALL_HINT = "pip install 'alfred-train[eval]'"


def split_tasks(tasks) -> list[str]:
    return [t.strip() for entry in tasks for t in str(entry).split(",") if t.strip()]


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def check_tasks(tasks, key: str = "--tasks") -> None:
    """lm-eval is installed and every task file exists and names a task (no model, no index)."""
    import importlib.util

    for package in ("lm_eval", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key}: evaluation needs lm-evaluation-harness; {INSTALL_HINT}")
    if not split_tasks(tasks):
        raise ConfigError(f"{key}: names no task; give lm-eval task names or task YAML files")
    for task in split_tasks(tasks):
        if is_task_file(task):
            task_name(Path(task), key)


def read_task_file(path: Path, key: str = "--tasks") -> dict:
    """A task YAML file with its `include:`s resolved, as lm-eval's index reads it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise ConfigError(f"{key}: task file {path} does not exist")
    if path.suffix != ".yaml":
        raise ConfigError(f"{key}: {path}: lm-eval indexes *.yaml task files only; rename it to {path.stem}.yaml")
    try:
        config = load_yaml(str(path), resolve_func=False, recursive=True)
    except Exception as err:  # yaml errors, a missing `include:` ...: one line naming the file
        text = " ".join(str(err).split())
        raise ConfigError(f"{key}: {path} is not a readable lm-eval task file: {text}") from None
    return config if isinstance(config, dict) else {}


def files_read_beside(path: Path) -> list[Path]:
    """The files lm-eval reads for task file `path` besides it, resolved: its `include:`s (and
    theirs) and the Python module of each `!function` found next to the YAML that names it."""
    import yaml

    found, todo = [], [path.resolve()]
    while todo:
        here = todo.pop()
        functions = []

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: functions.append(loader.construct_scalar(node)))
        try:
            config = yaml.load(here.read_text(), Loader=Loader)  # noqa: S506 (SafeLoader plus !function)
        except (OSError, yaml.YAMLError):
            continue  # read_task_file names it
        includes = config.get("include", []) if isinstance(config, dict) else []
        for name in includes if isinstance(includes, list) else [includes]:
            include = (here.parent / str(name)).resolve()
            if include not in found and include.is_file():
                found.append(include)
                todo.append(include)
        for spec in functions:
            module = (here.parent / f"{spec.rpartition('.')[0].replace('.', '/')}.py").resolve()
            if module not in found and module.is_file():
                found.append(module)
    return found


def task_name(path: Path, key: str = "--tasks") -> str:
    config = read_task_file(path, key)
    if "group" in config and not isinstance(config.get("task"), str):
        raise ConfigError(f"{key}: {path} is an lm-eval group file; give the task files of its group instead")
    name = config.get("task")
    if not isinstance(name, str):
        raise ConfigError(f"{key}: {path} has no `task:` name (lm-eval task YAML files start with one)")
    if not config.get("dataset_path") and not config.get("custom_dataset") and "class" not in config:
        raise ConfigError(f"{key}: {path} names no `dataset_path:` (a hub dataset, or `json` with "
                          f"dataset_kwargs.data_files) for task {name!r}")
    return name


def check_task_file(path: Path, key: str) -> None:
    """The file builds lm-eval's TaskConfig and its local data files are there and parse."""
    from lm_eval.api.task import ALL_OUTPUT_TYPES, TaskConfig

    config = read_task_file(path, key)
    if "class" in config:  # a Python task: its own code reads its data
        return
    fields = {k: v for k, v in config.items() if k not in ("tag", "group", "task_list")}
    try:
        TaskConfig(**fields)
    except TypeError as err:  # an unknown key
        raise ConfigError(f"{key}: {path}: {err.args[0].split('got ')[-1]}; see lm-eval's task guide for "
                          "the keys a task file takes") from None
    output_type = config.get("output_type")
    if output_type is not None and output_type not in ALL_OUTPUT_TYPES:
        raise ConfigError(f"{key}: {path}: output_type {output_type!r} is not one of {', '.join(ALL_OUTPUT_TYPES)}")
    for data in data_files(config):
        check_data_file(Path(data), path, key)


def data_files(config: dict) -> list[str]:
    """The local files a task's `dataset_kwargs.data_files` names (a path, a list, or split -> either)."""
    given = (config.get("dataset_kwargs") or {}).get("data_files")
    found = []
    for value in (given.values() if isinstance(given, dict) else [given]):
        found += value if isinstance(value, list) else [value]
    return [f for f in found if isinstance(f, str) and "://" not in f and not any(c in f for c in "*?[")]


def check_data_file(data: Path, task_file: Path, key: str) -> None:
    from alfred_train.data.files import jsonl_rows

    if not data.is_file():
        raise ConfigError(f"{key}: {task_file}: its data file {data} does not exist (dataset_kwargs.data_files; "
                          "a relative path is read from the directory the run starts in)")
    if data.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        for row in jsonl_rows(data):
            if row.error:
                raise ConfigError(f"{key}: {task_file}: {row.where}: {row.error}")


def resolve_tasks(tasks) -> tuple[list[str], list[str]]:
    """(task names, folders of the YAML files to register with lm-eval's TaskManager)."""
    names, folders = [], []
    for task in split_tasks(tasks):
        if is_task_file(task):
            names.append(task_name(Path(task)))
            folder = str(Path(task).resolve().parent)
            if folder not in folders:
                folders.append(folder)
        else:
            names.append(task)
    return names, folders


def check_one_file_per_name(tasks, indexed: dict[Path, str], key: str) -> None:
    """lm-eval indexes every *.yaml under the registered folders (`indexed`: `_named_in`) and keeps
    the first file of a name: two files named alike scored the other one, with a warning lost in its log."""
    for path in (Path(t).resolve() for t in split_tasks(tasks) if is_task_file(t)):
        name = indexed[path]
        others = [p for p, n in indexed.items() if n == name and p != path]
        if others:
            raise ConfigError(f"{key}: {path} and {others[0]} both name task {name!r}, and lm-eval would run one "
                              "of them; give each task file its own `task:` name")


def _named_in(folders: list[str]) -> dict[Path, str]:
    """task name of every readable task file lm-eval would index under `folders`."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("**/*.yaml")):
            try:
                found[path.resolve()] = task_name(path)
            except ConfigError:
                pass
    return found


def task_manager(names: list[str], folders: list[str], ours: set[str], key: str = "--tasks"):
    """lm-eval's TaskManager over our YAML folders (plus its own registry when a name is not among
    `ours`, the task names found in them)."""
    from lm_eval.tasks import TaskManager

    builtin = any(n not in ours for n in names)
    manager = TaskManager(include_path=folders or None, include_defaults=builtin)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise ConfigError(f"{key}: lm-eval knows no task {', '.join(missing)}; give a task YAML file or a "
                          "name from `lm-eval ls tasks`")
    return manager


def check_task_names(tasks, key: str):
    """Everything `check_tasks` checks, then each task file against lm-eval and its data, then every
    name against lm-eval's index (its ~15k task files take ~10 s to index, so this runs in the dry
    run, once before training and in `eval`, not at each config load). Returns (names, manager)."""
    check_tasks(tasks, key)
    for task in split_tasks(tasks):
        if is_task_file(task):
            check_task_file(Path(task), key)
    names, folders = resolve_tasks(tasks)
    indexed = _named_in(folders)  # every task file under the folders, read once
    check_one_file_per_name(tasks, indexed, key)
    return names, task_manager(names, folders, set(indexed.values()), key)

