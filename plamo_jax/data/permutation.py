"""Random-access pseudo-random permutations: position -> element in O(1) time and memory.

Row shuffling must permute the hundreds of millions of packed rows of a large corpus's epoch while
staying a pure function of (seed, row): a stored permutation would cost 8 bytes per row and minutes
to draw. A keyed Feistel network is a bijection on [0, 2^(2h)); "cycle walking" (applying it again
until the value falls below n) turns it into a bijection on [0, n), with fewer than 4 rounds of
walking on average since 2^(2h) < 4n. The round function is the splitmix64 finaliser of the half
and a per-round key, good enough to spread neighbours apart (this is shuffling, not cryptography).
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
ROUNDS = 6


def mix64(value: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mixing function."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, stream, block, ...), order-sensitive."""
    key = 0
    for part in parts:
        key = mix64(key ^ (int(part) & _MASK64))
    return key


class IndexPermutation:
    """A bijection of [0, size) chosen by `key`: `perm(i)` is the element at position i."""

    def __init__(self, size: int, key: int):
        if size < 1:
            raise ValueError(f"a permutation of {size} elements; expected >= 1")
        self.size = size
        half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
        self._half_bits = half_bits
        self._half_mask = (1 << half_bits) - 1
        self._round_keys = [derive_key(key, round_index) for round_index in range(ROUNDS)]

    def _feistel(self, value: int) -> int:
        left, right = value >> self._half_bits, value & self._half_mask
        for round_key in self._round_keys:
            left, right = right, left ^ (mix64(right ^ round_key) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"position {index} outside [0, {self.size})")
        value = self._feistel(index)
        while value >= self.size:  # cycle walking: stays a bijection on [0, size)
            value = self._feistel(value)
        return value
