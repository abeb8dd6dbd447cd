/* The hot loop of the per-table fingerprint (docs/postgres-logical.md, section 4), in C.
 *
 * pg_dump writes a table's COPY data as one chunk per row: a sign byte (0), a four-byte
 * little-endian length, then the row and its newline. `sum_rows` walks such chunks from a
 * chunk's start and adds each row's XXH3-128 (seed 0, as an unsigned 128-bit integer: the
 * canonical big-endian digest) to a sum modulo 2^128. It stops, leaving the chunk to the Python
 * reader in archive.py, at anything else: a chunk that is not exactly one line (the "\." chunk
 * that ends the data, or not pg_dump's shape), a negative or zero length, a chunk not yet
 * wholly in the buffer. The Python reader defines the result; this only computes it faster,
 * and the unit tests compare the two on well-formed and damaged archives.
 *
 * The buffer is read with the GIL released when there is enough of it (the other pipeline
 * threads run meanwhile); the buffer export keeps the bytearray from being resized meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>
#if XXH_VERSION_NUMBER < 800
#error "xxhash 0.8.0 or later is needed: XXH3's output was not final before"
#endif

#define CHUNK_HEAD 5
/* Below this much input the GIL is kept: a read holding thousands of tiny tables makes a call
 * per table, and taking the GIL back can wait for another thread's switch interval each time. */
#define RELEASE_GIL_BYTES 65536

/* Why the walk stopped (the fourth item returned). */
enum { NEED_MORE = 0, WALK = 1, NOT_A_ROW = 2 };

static PyObject *
sum_rows(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, max_row;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &pos, &max_row))
        return NULL;
    if (pos < 0 || pos > view.len || max_row < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos outside the buffer, or a negative max_row");
        return NULL;
    }
    const unsigned char *buf = view.buf;
    const Py_ssize_t size = view.len;
    uint64_t rows = 0, lo = 0, hi = 0;
    int state;

    PyThreadState *released = size - pos >= RELEASE_GIL_BYTES ? PyEval_SaveThread() : NULL;
    for (;;) {
        if (size - pos < CHUNK_HEAD) {
            state = NEED_MORE;
            break;
        }
        if (buf[pos] != 0) { /* a negative length: the Python reader reports it */
            state = WALK;
            break;
        }
        const uint64_t len = (uint64_t)buf[pos + 1] | (uint64_t)buf[pos + 2] << 8
                             | (uint64_t)buf[pos + 3] << 16 | (uint64_t)buf[pos + 4] << 24;
        if (len == 0) { /* the end of the data block */
            state = WALK;
            break;
        }
        if (len > (uint64_t)(size - pos - CHUNK_HEAD)) {
            /* Not all here yet: wait for a short row, let the reader walk a long one. */
            state = len <= (uint64_t)max_row ? NEED_MORE : WALK;
            break;
        }
        const unsigned char *row = buf + pos + CHUNK_HEAD;
        const unsigned char *newline = memchr(row, '\n', len);
        if (newline != row + len - 1 || (len == 3 && row[0] == '\\' && row[1] == '.')) {
            state = NOT_A_ROW;
            break;
        }
        const XXH128_hash_t h = XXH3_128bits(row, len - 1);
        lo += h.low64;
        hi += h.high64 + (lo < h.low64);
        rows++;
        pos += CHUNK_HEAD + (Py_ssize_t)len;
    }
    if (released != NULL)
        PyEval_RestoreThread(released);

    PyBuffer_Release(&view);
    return Py_BuildValue("nKKKi", pos, (unsigned long long)rows, (unsigned long long)hi,
                         (unsigned long long)lo, state);
}

static PyMethodDef methods[] = {
    {"sum_rows", sum_rows, METH_VARARGS,
     "sum_rows(buf, pos, max_row) -> (end, rows, high64, low64, state)\n\n"
     "Walk pg_dump's one-row chunks of `buf` from the chunk starting at `pos`; return where\n"
     "the walk stopped, the rows taken and their XXH3-128 sum modulo 2**128 in two halves,\n"
     "and why it stopped: NEED_MORE (an unfinished chunk of at most `max_row` bytes, or an\n"
     "unfinished header), WALK (a negative or zero length, or a longer unfinished chunk), or\n"
     "NOT_A_ROW (a whole chunk that is not one line other than the terminator)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowsum",
    "pg_dump's one-row chunks summed with XXH3-128: the fingerprint's hot loop.", -1, methods,
};

PyMODINIT_FUNC
PyInit__rowsum(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NEED_MORE", NEED_MORE) < 0
        || PyModule_AddIntConstant(m, "WALK", WALK) < 0
        || PyModule_AddIntConstant(m, "NOT_A_ROW", NOT_A_ROW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
