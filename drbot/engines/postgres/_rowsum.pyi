# The C extension built from _rowsum.c (setup.py); see there for the contract.
NEED_MORE: int
WALK: int
NOT_A_ROW: int

def sum_rows(
    buf: bytes | bytearray, pos: int, max_row: int, /
) -> tuple[int, int, int, int, int]: ...
