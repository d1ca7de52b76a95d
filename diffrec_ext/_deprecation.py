"""Old keyword names kept working for a while: `renamed_keywords(seeds="num_samples")` lets a
function take `seeds=` with a DeprecationWarning that names the new spelling."""

from __future__ import annotations

import functools
import warnings

# S, the number of noise draws averaged at inference, was called `seeds` beside the RNG `seed`
NUM_SAMPLES_RENAME = {"seeds": "num_samples"}


def renamed_keywords(**renames: str):
    """Decorator: each keyword `old` of `renames` is passed on as `renames[old]`, with a
    DeprecationWarning; giving both spellings is a TypeError."""

    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__qualname__}() got both {old!r} (deprecated) and {new!r}")
                    warnings.warn(f"{function.__qualname__}(): {old!r} is deprecated, use {new!r}",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return call

    return wrap
