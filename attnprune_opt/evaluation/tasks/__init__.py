"""lm-eval task definitions over the local data copies (see README.md here); a package so that it ships in wheels.

lm-eval reads this folder through ``TaskManager(include_path=...)`` (:func:`..lm_eval_tasks.tasks_dir`).
"""
