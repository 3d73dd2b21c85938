"""One output directory, one run: its lock, and the settings it was made with.

Training (runs.py), evaluation (03_evaluate.py) and the toy demo (toy/demo.py) keep what they
write in a directory that a second invocation must neither interleave with (lock_directory) nor
silently reuse under other settings (changed_settings names every difference, in one wording).
"""
import fcntl
import os

_held_locks = []


def lock_directory(directory):
    """An exclusive lock on DIR/.lock until this process ends (a kill releases it too): a second
    run into the same directory stops at once instead of interleaving with the first. A POSIX
    record lock, not flock: data-loader workers forked from this process do not hold it on."""
    os.makedirs(directory, exist_ok=True)
    handle = open(os.path.join(directory, ".lock"), "w")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: {directory} is in use by another run (it holds the lock on {handle.name})") from None
    _held_locks.append(handle)


def changed_settings(saved, settings, names=None):
    """-> 'NAME OLD -> NEW' for each setting that differs (one added since counts too). A setting is
    named as its flag (--stage2-steps), or as names[key] says for one that is not a flag."""
    names = names or {}
    return [f"{names.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {settings.get(k)!r}"
            for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
