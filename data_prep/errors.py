"""The project's exception hierarchy: one base class, each user-facing error under it with its exit status.

``data_prep`` is the lowest layer (``pretrain`` imports it, never the reverse), so the base lives here and every
package can raise and catch it. A command line catches :class:`DistillError`, prints its message (one line that names
the file, key or value and says what to do) without a traceback, and exits with the class's ``exit_code``.

| class | where | exit |
| --- | --- | --- |
| ``DataPrepError`` | data_prep: bad source, file, tokenizer, shards | 2 |
| ``DataPrepError`` > ``OutputExistsError`` | a folder writer refused a folder it did not write | 2 |
| ``DataPrepError`` > ``DiskFullError`` | any write stopped by a full disk (data_prep.files) | 1 |
| ``pretrain.schema.ConfigError`` | a config file, key, value or override | 2 |
| ``pretrain.tasks.TaskError`` / ``DownstreamError`` / ``EvalError`` | labeled tasks, fine-tuning, evaluation | 2 |
| ``pretrain.slurm.SubmitError`` | SLURM submission | 2 |
| ``pretrain.runtime.RunError`` (``TrainingError``, ``CheckpointError``, ``RankFailed``) | a run that failed | 1 |
| ``pretrain.rundir.RunLocked`` | another live run holds the run directory | 1 |
"""


class DistillError(Exception):
    """Base of every error this project raises for the user to act on: bad input, or a run that cannot go on.

    Subclasses keep a builtin base too (``ValueError`` for bad input, ``RuntimeError`` for a failed run), so code
    that catches those keeps working. ``exit_code`` is the process exit status a command line maps it to.
    """

    exit_code: int = 1


class DataPrepError(DistillError):
    """A user-facing error: the message names the file / source / value, what is wrong and what to do.

    The command line prints it without a traceback and exits with status 2.
    """

    exit_code = 2


class DiskFullError(DataPrepError):
    """A write failed for lack of space (``ENOSPC``, ``EDQUOT``, ``EFBIG``) or at the I/O level (``EIO``), raised by
    :mod:`data_prep.files`. The message (one line, :func:`data_prep.files.disk_full_message`) names what was being
    written, where, the space needed and free, and what is intact; nothing half-written is left. Exit status 1 (a
    command that cannot go on, not bad input)."""

    exit_code = 1


class OutputExistsError(DataPrepError):
    """A folder writer refused a target it did not write (:func:`data_prep.files.check_replaceable`); the message
    names the folder and what to do. Exit status 2."""
