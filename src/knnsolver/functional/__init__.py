"""Pure functions holding each solver's maths, testable against a direct computation.

Modules: :mod:`.rbf` (nearest-neighbour RBF), :mod:`.hal` (hypersphere anchor
loss), :mod:`.crc` (DML-CRC) and :mod:`.centralized` (Normalize-Scale and the
global centralized ranking loss). Each module lists its public names in
``__all__``; they are re-exported here.
"""
from knnsolver.functional.centralized import *  # noqa: F401,F403
from knnsolver.functional.crc import *  # noqa: F401,F403
from knnsolver.functional.hal import *  # noqa: F401,F403
from knnsolver.functional.rbf import *  # noqa: F401,F403
