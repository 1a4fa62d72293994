"""Greedy longest-match encoding over UTF-8 bytes, vectorized with numpy.

RWKV World models split text by greedy longest match: from the current byte,
take the longest vocabulary entry that is a prefix of the remaining bytes,
emit its id and continue after it. The encoder checks that every single
byte is an entry, so the match never fails.

Encoding here gives exactly that result in three steps:

1. Cut the bytes into pieces between adjacent bytes ``(a, b)`` that never
   occur next to each other inside any vocabulary entry. No entry can span
   such a boundary, so the greedy result of the text is the concatenation of
   the greedy results of its pieces. In the World vocabulary 8,333 of the
   65,536 byte pairs occur inside an entry, and English or Chinese prose
   falls apart into pieces of 3 to 5 bytes on average.
2. Look every piece of at most 15 bytes up in hash tables of the entries.
   About 96 % of the pieces of English and Chinese prose are one entry, so
   this step finishes most of the text in a few array operations.
3. Split the other pieces by walking the trie of the vocabulary, one byte
   per round for all pieces at once. Pieces longer than 64 bytes (runs of
   spaces, base64 blobs) and the last few pieces of the walk are finished by
   a Python loop instead.

Why not a plain loop: a greedy longest match is sequential, and a Python loop
over the bytes runs at about 3.5 MB/s on English (the reference trie in
BlinkDL's ``rwkv`` 0.8.32, measured on the 2-core x86 development machine).
The exact ``tokenizers`` pipeline for this vocabulary (see ``export.py``)
runs at 0.4 to 1 MB/s there. ``bench/bench_tokenizer.py`` measures all three.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import TokenizerError

_U64 = np.uint64

# Odd 64-bit multipliers for multiplicative hashing.
_MULTIPLIER_A = _U64(0x9E3779B97F4A7C15)
_MULTIPLIER_B = _U64(0xC2B2AE3D27D4EB4F)

# A byte string of 1 to 7 bytes is keyed by one uint64: its bytes in
# little-endian order and its length in the top byte. _SHORT_MASK and
# _SHORT_TAG build that key from the 8 bytes read at its start, indexed by
# the length clipped to 8. Length 8 and more gives a top byte of 8 or more,
# which no stored key has.
_SHORT_MASK = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=_U64)
_SHORT_TAG = np.array([k << 56 for k in range(9)], dtype=_U64)
_MAX_SHORT_LENGTH = 7

# A byte string of 8 to 15 bytes is keyed by two uint64: bytes 0..7, and
# bytes 8..14 with the length in the top byte.
_MAX_KEYED_LENGTH = 15

# Texts shorter than this many bytes are encoded by the Python loop, because
# the array path has a fixed cost of about 100 microseconds. On the 2-core x86
# development machine the loop took 82 us for 256 bytes of English (the array
# path 123 us) and 375 us for 512 bytes (the array path 252 us).
_MIN_VECTORIZED_BYTES = 400

# Steps 1 and 2 work on windows of about this many bytes, so that their
# temporary arrays stay small and reuse freed memory. On 1 MiB of Chinese text
# on the 2-core x86 development machine, windows of 64, 128 and 256 KiB
# encoded in 14.5, 13.5 and 16.1 ms.
_WINDOW_BYTES = 1 << 17

# Upper bound on the bytes encoded in one pass of all three steps, which
# bounds the memory held between the steps to a few tens of MB.
_CHUNK_BYTES = 1 << 22

# Pieces longer than this go to the Python loop: the trie walk of step 3 takes
# one round of array operations per byte of its longest piece.
_MAX_WALKED_PIECE = 64

# The trie walk hands its last pieces to the Python loop once fewer than this
# many are left, since a round costs about 40 array calls whatever its size.
_MIN_WALKERS = 32


def _short_key(item: bytes) -> int:
    return int.from_bytes(item, "little") | (len(item) << 56)


def _long_key(item: bytes) -> tuple[int, int]:
    return int.from_bytes(item[:8], "little"), int.from_bytes(item[8:], "little") | (len(item) << 56)


class _HashTable:
    """A cuckoo hash table from keys of one or two uint64 words to int64
    values.

    Each key sits in one of its two slots, so a vectorized lookup reads two
    rows per key and needs no probing loop. A row contains the key words and
    the value. The all-zero key marks an empty row and must not be stored.

    Args:
        keys: Key words, shape ``(n, 1)`` or ``(n, 2)``, uint64.
        values: Value of each key, int64, not negative.
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self._width = keys.shape[1]
        bits = max(8, int(4 * len(keys)).bit_length())  # load factor <= 1/4
        while not self._build(keys, values, bits):
            bits += 1

    def _build(self, keys: np.ndarray, values: np.ndarray, bits: int) -> bool:
        """Place all keys in a table of ``2**bits`` rows. Return False if the
        insertion cycles, so that the caller retries with a larger table."""
        self._shift = _U64(64 - bits)
        self._second_shift = _U64(64 - 2 * bits)
        self._mask = _U64((1 << bits) - 1)
        first, second = (slots.tolist() for slots in self._slots(*keys.T))
        owner = [-1] * (1 << bits)
        for key in range(len(keys)):
            # Take the first slot if free, else the second. If that is taken,
            # evict its occupant and move it to its other slot, and so on.
            current = key
            slot = first[key] if owner[first[key]] < 0 else second[key]
            for _ in range(1000):
                current, owner[slot] = owner[slot], current
                if current < 0:
                    break
                slot = second[current] if first[current] == slot else first[current]
            else:
                return False

        owners = np.array(owner)
        filled = np.flatnonzero(owners >= 0)
        rows = np.zeros((1 << bits, self._width + 1), _U64)
        rows[filled, : self._width] = keys[owners[filled]]
        rows[filled, self._width] = values[owners[filled]]
        self._rows = rows
        return True

    def _mix(self, key0: np.ndarray, key1: np.ndarray | None) -> np.ndarray:
        """Return the hash product of every key. The first slot is its top
        bits and the second slot the bits below them."""
        with np.errstate(over="ignore"):
            if key1 is None:
                return key0 * _MULTIPLIER_A
            return (key0 ^ (key1 * _MULTIPLIER_B)) * _MULTIPLIER_A

    def _slots(self, key0: np.ndarray, key1: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        mixed = self._mix(key0, key1)
        return (mixed >> self._shift).view(np.int64), ((mixed >> self._second_shift) & self._mask).view(np.int64)

    def get(self, key0: np.ndarray, key1: np.ndarray | None = None) -> np.ndarray:
        """Look up many keys at once.

        Args:
            key0: First word of every key, uint64.
            key1: Second word of every key for a two-word table.

        Returns:
            The int64 value of every key, or -1 where the key is absent.
        """
        mixed = self._mix(key0, key1)
        rows = np.take(self._rows, (mixed >> self._shift).view(np.int64), axis=0)
        found = rows[:, 0] == key0
        if key1 is not None:
            found &= rows[:, 1] == key1
        values = np.where(found, rows[:, -1], _U64(2**64 - 1)).view(np.int64)

        # Most keys were placed in their first slot (89 % of the World tokens
        # of up to 7 bytes), so read the second slot only for the others.
        retry = np.flatnonzero(~found)
        if len(retry):
            second = ((mixed[retry] >> self._second_shift) & self._mask).view(np.int64)
            rows = np.take(self._rows, second, axis=0)
            found = rows[:, 0] == key0[retry]
            if key1 is not None:
                found &= rows[:, 1] == key1[retry]
            values[retry[found]] = rows[found, -1].view(np.int64)
        return values


class LongestMatchEncoder:
    """Exact greedy longest-match encoder for a byte vocabulary.

    Args:
        token_bytes: The bytes of every token, indexed by id. Ids without a
            token (such as World's end-of-text id 0) are ``b""`` or ``None``.

    Raises:
        TokenizerError: If a single byte value has no token, since greedy
            matching then fails on text containing that byte, or if two ids
            have the same bytes.
    """

    def __init__(self, token_bytes: Sequence[bytes | None]):
        self.token_ids: dict[bytes, int] = {}
        for token_id, data in enumerate(token_bytes):
            if not data:
                continue
            if data in self.token_ids:
                raise TokenizerError(
                    f"token ids {self.token_ids[data]} and {token_id} both have the bytes "
                    f"{data!r}; greedy longest match needs each byte string once"
                )
            self.token_ids[data] = token_id

        missing = [value for value in range(256) if bytes([value]) not in self.token_ids]
        if missing:
            raise TokenizerError(
                f"the vocabulary has no token for the single bytes {missing[:8]} "
                f"({len(missing)} in all); greedy longest match needs all 256"
            )

        self._build_pair_tables()
        self._build_token_tables()
        self._build_trie()

        # The int object of every id. Indexing this object array and calling
        # tolist() shares the objects instead of creating one per id: 4 ms
        # instead of 7.5 ms for 350,000 ids on the 2-core x86 machine.
        self._id_objects = np.array(list(range(len(token_bytes))), dtype=object)

    def _build_pair_tables(self) -> None:
        """Build the tables indexed by a byte pair: whether a token can span
        it, and the length of the longest token that starts with it."""
        tokens = [data for data in self.token_ids if len(data) > 1]
        joined = np.frombuffer(b"".join(tokens), np.uint8).astype(np.int64)
        lengths = np.array([len(data) for data in tokens], np.int64)
        starts = np.cumsum(lengths) - lengths

        # All pairs of adjacent bytes in the joined tokens, except the pairs
        # that span two tokens.
        inside = np.ones(max(len(joined) - 1, 0), bool)
        inside[starts[1:] - 1] = False
        crossable = np.zeros(65536, bool)
        crossable[((joined[:-1] << 8) | joined[1:])[inside]] = True

        longest_by_pair = np.zeros(65536, np.int64)
        np.maximum.at(longest_by_pair, (joined[starts] << 8) | joined[starts + 1], lengths)

        # Step 1 reads the text as little-endian uint16 at every byte offset,
        # where the pair (a, b) reads as a | b << 8, so the table is indexed
        # that way.
        pairs = np.arange(65536)
        self._uncrossable = ~crossable[((pairs & 0xFF) << 8) | (pairs >> 8)]
        self._longest_by_pair = longest_by_pair.tolist()
        self._byte_token = np.array([self.token_ids[bytes([value])] for value in range(256)], np.int64)
        self._byte_token_list = self._byte_token.tolist()

    def _build_token_tables(self) -> None:
        """Build the exact-match tables of the tokens of 1 to 7 and of 8 to 15
        bytes."""
        short = [data for data in self.token_ids if len(data) <= _MAX_SHORT_LENGTH]
        self._short_tokens = _HashTable(
            np.array([[_short_key(data)] for data in short], _U64),
            np.array([self.token_ids[data] for data in short], np.int64),
        )
        long = [data for data in self.token_ids if _MAX_SHORT_LENGTH < len(data) <= _MAX_KEYED_LENGTH]
        self._long_tokens = _HashTable(
            np.array([_long_key(data) for data in long], _U64).reshape(-1, 2),
            np.array([self.token_ids[data] for data in long], np.int64),
        )

    def _build_trie(self) -> None:
        """Build the trie of all tokens as a hash table of edges.

        Node ``v + 1`` is the one-byte prefix ``bytes([v])``, and longer
        prefixes get ids from 257 on. The edge from node ``u`` on byte ``c``
        has the key ``u * 256 + c``.
        """
        node_ids = {bytes([value]): value + 1 for value in range(256)}
        edge_keys, edge_nodes = [], []
        for data in self.token_ids:
            parent = data[0] + 1
            for end in range(2, len(data) + 1):
                node = node_ids.get(data[:end])
                if node is None:
                    node = len(node_ids) + 1
                    node_ids[data[:end]] = node
                    edge_keys.append(parent * 256 + data[end - 1])
                    edge_nodes.append(node)
                parent = node

        self._node_token = np.zeros(len(node_ids) + 1, np.int64)
        self._node_token[[node_ids[data] for data in self.token_ids]] = list(self.token_ids.values())
        self._trie_edges = _HashTable(np.array(edge_keys, _U64).reshape(-1, 1), np.array(edge_nodes, np.int64))

    # --------------------------------------------------------------- encoding

    def encode(self, data: bytes) -> list[int]:
        """Encode bytes by greedy longest match.

        Args:
            data: The bytes to encode, usually UTF-8 text.

        Returns:
            The token ids.
        """
        if len(data) < _MIN_VECTORIZED_BYTES:
            return self._encode_with_loop(data, 0, len(data))

        end = self._next_cut(data, _CHUNK_BYTES)
        ids = self._encode_chunk(data[:end])
        while end < len(data):
            start, end = end, self._next_cut(data, end + _CHUNK_BYTES)
            ids += self._encode_chunk(data[start:end])
        return ids

    def _next_cut(self, data: bytes | memoryview, position: int) -> int:
        """Return the first position at or after ``position`` that no token
        spans, or ``len(data)``."""
        while position < len(data):
            window = data[position - 1 : position + 4096]
            pairs = np.ndarray((len(window) - 1,), dtype="<u2", buffer=window, strides=(1,))
            cuts = np.flatnonzero(np.take(self._uncrossable, pairs))
            if len(cuts):
                return position + int(cuts[0])
            position += len(window) - 1
        return len(data)

    def _encode_with_loop(self, data: bytes, start: int, end: int) -> list[int]:
        """Encode ``data[start:end]`` one token at a time in Python.

        At each position only lengths up to the longest token that starts with
        the next two bytes are tried, longest first.
        """
        token_ids = self.token_ids
        longest_by_pair = self._longest_by_pair
        byte_token = self._byte_token_list
        ids = []
        position = start
        while position < end:
            longest = 1
            if position + 1 < end:
                longest = min(longest_by_pair[(data[position] << 8) | data[position + 1]], end - position)
            for length in range(longest, 1, -1):
                token_id = token_ids.get(data[position : position + length])
                if token_id is not None:
                    ids.append(token_id)
                    position += length
                    break
            else:
                ids.append(byte_token[data[position]])
                position += 1
        return ids

    def _encode_chunk(self, data: bytes) -> list[int]:
        """Encode one chunk with array operations (steps 1 to 3 of the module
        docstring).

        Steps 1 and 2 and the final assembly run per window of about
        ``_WINDOW_BYTES``, so that their temporary arrays stay small. Step 3
        runs once for the chunk, because each of its rounds has a fixed cost.
        """
        padded = data + bytes(16)

        # Steps 1 and 2, window by window.
        windows = []  # (piece ids with -1 where a piece is not one token, their indices)
        split_starts, split_ends = [], []
        start = 0
        while start < len(data):
            end = self._next_cut(data, start + _WINDOW_BYTES)
            starts, lengths = self._cut_pieces(padded, start, end)
            # words[i] is the little-endian uint64 of the 8 bytes from offset
            # start + i. It covers only the window because np.take copies a
            # strided source array whole.
            words = np.ndarray((end - start + 8,), dtype="<u8", buffer=padded, offset=start, strides=(1,))
            piece_ids = self._match_pieces(words, starts, lengths)
            unmatched = np.flatnonzero(piece_ids < 0)
            windows.append((piece_ids, unmatched))
            split_starts.append(starts[unmatched] + start)
            split_ends.append(split_starts[-1] + lengths[unmatched])
            start = end

        # Step 3 for the whole chunk. Sorting the emitted tokens by piece keeps
        # their emission order, which is their order in the text, per piece.
        starts = np.concatenate(split_starts)
        piece, rank, token_id = self._split_pieces(data, padded, starts, np.concatenate(split_ends))
        order = np.argsort(piece, kind="stable")
        piece, rank, token_id = piece[order], rank[order], token_id[order]
        token_counts = np.bincount(piece, minlength=len(starts))
        first_token = np.zeros(len(starts) + 1, np.int64)
        np.cumsum(token_counts, out=first_token[1:])

        # Assemble the ids window by window.
        ids: list[int] = []
        first_piece = 0
        for piece_ids, unmatched in windows:
            # Repeat every split piece's -1 once per token, then write the
            # tokens there. A split piece's first token goes to its index plus
            # the extra tokens of the split pieces before it.
            end_piece = first_piece + len(unmatched)
            window_counts = token_counts[first_piece:end_piece]
            counts = np.ones(len(piece_ids), np.int64)
            counts[unmatched] = window_counts
            result = np.repeat(piece_ids, counts)

            extra = window_counts - 1
            first_offsets = unmatched + np.cumsum(extra) - extra
            tokens = slice(first_token[first_piece], first_token[end_piece])
            result[first_offsets[piece[tokens] - first_piece] + rank[tokens]] = token_id[tokens]
            if len(windows) == 1:
                return self._id_objects[result].tolist()
            ids += self._id_objects[result].tolist()
            first_piece = end_piece
        return ids

    def _cut_pieces(self, padded: bytes, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the offsets from ``start`` and the lengths of the pieces of
        ``[start, end)`` (step 1), where ``start`` and ``end`` are cuts."""
        # is_start[i] is True where a piece starts at start + i.
        is_start = np.empty(end - start, bool)
        is_start[0] = True
        pairs = np.ndarray((end - start - 1,), dtype="<u2", buffer=padded, offset=start, strides=(1,))
        np.take(self._uncrossable, pairs, out=is_start[1:])
        starts = np.flatnonzero(is_start)
        return starts, np.diff(starts, append=end - start)

    def _match_pieces(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Return the token id of every piece that is one token, and -1 for
        the others (step 2).

        Args:
            words: The uint64 read at every byte offset of the window.
            starts: Offset of each piece in the window.
            lengths: Length of each piece.
        """
        clipped = np.minimum(lengths, _MAX_SHORT_LENGTH + 1)
        keys = np.take(words, starts)
        keys &= np.take(_SHORT_MASK, clipped)
        keys |= np.take(_SHORT_TAG, clipped)
        piece_ids = self._short_tokens.get(keys)

        unmatched = np.flatnonzero(piece_ids < 0)
        unmatched_lengths = lengths[unmatched]
        long = unmatched[(unmatched_lengths > _MAX_SHORT_LENGTH) & (unmatched_lengths <= _MAX_KEYED_LENGTH)]
        if len(long):
            long_starts, long_lengths = starts[long], lengths[long]
            key0 = np.take(words, long_starts)
            tail_mask = np.take(_SHORT_MASK, long_lengths - 8)
            key1 = (np.take(words, long_starts + 8) & tail_mask) | (long_lengths.astype(_U64) << _U64(56))
            piece_ids[long] = self._long_tokens.get(key0, key1)
        return piece_ids

    def _split_pieces(
        self, data: bytes, padded: bytes, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split pieces that are more than one token (step 3).

        Every piece gets a walker that follows the trie of the vocabulary one
        byte per round, all walkers at once. A walker remembers the longest
        token on its path. When the next byte has no edge or the piece ends,
        it emits that token and restarts right after it.

        Args:
            data: The chunk.
            padded: The chunk followed by 16 zero bytes.
            starts: Start offset of each piece.
            ends: End offset of each piece.

        Returns:
            Three int64 arrays of equal length: for every emitted token, the
            index of its piece, its rank within the piece, and its id.
        """
        byte_values = np.frombuffer(padded, np.uint8)
        output: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64),) * 3]

        pieces = np.arange(len(starts))
        walked = (ends - starts) <= _MAX_WALKED_PIECE
        looped = list(zip(pieces[~walked].tolist(), starts[~walked].tolist(), ends[~walked].tolist(), [0] * int((~walked).sum())))
        pieces, position, ends = pieces[walked], starts[walked], ends[walked]

        rank = np.zeros(len(pieces), np.int64)
        node = np.take(byte_values, position).astype(np.int64) + 1
        depth = np.ones(len(pieces), np.int64)
        best_length = np.ones(len(pieces), np.int64)
        best_token = np.take(self._byte_token, node - 1)

        while len(pieces) >= _MIN_WALKERS:
            # Follow the edge for the next byte where the piece goes on.
            next_position = position + depth
            edge_keys = (node << 8).view(_U64) | np.take(byte_values, next_position)
            child = self._trie_edges.get(edge_keys)
            advanced = (child >= 0) & (next_position < ends)
            node = np.where(advanced, child, node)
            depth += advanced
            token = np.take(self._node_token, node)
            improved = advanced & (token > 0)
            best_length = np.where(improved, depth, best_length)
            best_token = np.where(improved, token, best_token)

            # Walkers that could not advance emit their longest token and
            # restart after it, or finish at the end of their piece.
            stopped = np.flatnonzero(~advanced)
            if len(stopped) == 0:
                continue
            output.append((pieces[stopped], rank[stopped], best_token[stopped]))
            rank[stopped] += 1
            position[stopped] += best_length[stopped]

            alive = position < ends
            restart = stopped[alive[stopped]]
            node[restart] = np.take(byte_values, position[restart]).astype(np.int64) + 1
            depth[restart] = 1
            best_length[restart] = 1
            best_token[restart] = np.take(self._byte_token, node[restart] - 1)
            if not alive.all():
                pieces, position, ends, rank = pieces[alive], position[alive], ends[alive], rank[alive]
                node, depth = node[alive], depth[alive]
                best_length, best_token = best_length[alive], best_token[alive]

        # The last few walkers restart in the loop from their current token.
        looped += zip(pieces.tolist(), position.tolist(), ends.tolist(), rank.tolist())
        for piece, start, end, first_rank in looped:
            ids = self._encode_with_loop(data, start, end)
            output.append(
                (
                    np.full(len(ids), piece, np.int64),
                    np.arange(first_rank, first_rank + len(ids), dtype=np.int64),
                    np.array(ids, np.int64),
                )
            )
        return tuple(np.concatenate(column) for column in zip(*output))
