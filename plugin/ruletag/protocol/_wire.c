/* ruletag.protocol._wire: the entry scanner's common case in C.
 *
 * entry_ends(buf, start, pos, end, limit) walks the packed entries of buf from pos while each
 * has one of Fluent Bit's two shapes, [EventTime, map] (v1) and [[EventTime, metadata], record]
 * (v2), or [integer time, map] (fluent-logger's default), and returns (ends, pos, v2): the
 * entries' end offsets relative to start, where the walk
 * stopped, and whether a v2 entry was seen. It stops before anything else (another shape, a
 * truncated or malformed object, nesting deeper than it follows, `limit` entries), so the
 * Python scanner (ruletag.protocol.entries.scan_entries, the reference) handles that entry and
 * reports any error. It only accepts what msgpack's Unpacker.skip accepts, with the same end.
 * The walk itself runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define WIRE_ABI 1
#define MAX_DEPTH 64

static uint64_t be_n(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Move *pp past one msgpack object. 0, or -1 (stop: malformed, cut short, too deep). */
static int skip_one(const unsigned char **pp, const unsigned char *end, int depth)
{
    const unsigned char *p = *pp;
    uint64_t n = 0;    /* bytes after the header (scalars) or items (containers) */
    int w = 0;         /* width of a length field */
    int items = 0;     /* 1: array, 2: map */
    if (p >= end || depth > MAX_DEPTH) {
        return -1;
    }
    unsigned c = *p++;
    if (c <= 0x7F || c >= 0xE0 || c == 0xC0 || c == 0xC2 || c == 0xC3) {
        *pp = p;
        return 0;
    }
    if (c <= 0x8F) {
        n = c & 0x0F;
        items = 2;
    } else if (c <= 0x9F) {
        n = c & 0x0F;
        items = 1;
    } else if (c <= 0xBF) {
        n = c & 0x1F;
    } else {
        switch (c) {
        case 0xC4: case 0xD9: w = 1; break;
        case 0xC5: case 0xDA: w = 2; break;
        case 0xC6: case 0xDB: w = 4; break;
        case 0xC7: case 0xC8: case 0xC9: /* ext 8/16/32: length, type byte, data */
            w = 1 << (c - 0xC7);
            if (end - p < w) {
                return -1;
            }
            n = be_n(p, w) + 1;
            p += w;
            w = 0;
            break;
        case 0xCC: case 0xD0: n = 1; break;
        case 0xCD: case 0xD1: n = 2; break;
        case 0xCA: case 0xCE: case 0xD2: n = 4; break;
        case 0xCB: case 0xCF: case 0xD3: n = 8; break;
        case 0xD4: n = 2; break; /* fixext 1..16: type byte + data */
        case 0xD5: n = 3; break;
        case 0xD6: n = 5; break;
        case 0xD7: n = 9; break;
        case 0xD8: n = 17; break;
        case 0xDC: w = 2; items = 1; break;
        case 0xDD: w = 4; items = 1; break;
        case 0xDE: w = 2; items = 2; break;
        case 0xDF: w = 4; items = 2; break;
        default: return -1; /* 0xC1: never used */
        }
        if (w) {
            if (end - p < w) {
                return -1;
            }
            n = be_n(p, w);
            p += w;
        }
    }
    if (!items) {
        if (n > (uint64_t)(end - p)) {
            return -1;
        }
        *pp = p + n;
        return 0;
    }
    n *= (uint64_t)items;
    if (n > (uint64_t)(end - p)) {
        return -1; /* each item takes a byte at least */
    }
    for (uint64_t i = 0; i < n; i++) {
        if (skip_one(&p, end, depth + 1)) {
            return -1;
        }
    }
    *pp = p;
    return 0;
}

static int is_map_byte(unsigned c)
{
    return (c >= 0x80 && c <= 0x8F) || c == 0xDE || c == 0xDF;
}

/* The size of the time at p when it is an EventTime or an integer (fluent-logger's default),
 * else 0: a float time is rewritten by the Python scanner. */
static Py_ssize_t time_size(const unsigned char *p, Py_ssize_t left)
{
    unsigned c = p[0];
    Py_ssize_t n;
    if (c == 0xD7) {
        n = left >= 2 && p[1] == 0 ? 10 : 0;
    } else if (c <= 0x7F || c >= 0xE0) {
        n = 1;
    } else if (c == 0xCC || c == 0xD0) {
        n = 2;
    } else if (c == 0xCD || c == 0xD1) {
        n = 3;
    } else if (c == 0xCE || c == 0xD2) {
        n = 5;
    } else if (c == 0xCF || c == 0xD3) {
        n = 9;
    } else {
        n = 0;
    }
    return n < left ? n : 0;
}

/* Walk entries from buf + pos; their ends (relative to start) go to ends[]. Returns the count. */
static Py_ssize_t walk(const unsigned char *buf, Py_ssize_t start, Py_ssize_t *pos,
                       Py_ssize_t end, Py_ssize_t limit, Py_ssize_t *ends, int *v2)
{
    const unsigned char *stop = buf + end;
    Py_ssize_t n = 0;
    while (n < limit && *pos < end) {
        const unsigned char *p = buf + *pos;
        Py_ssize_t left = end - *pos;
        int is_v2;
        Py_ssize_t t = left >= 3 && p[0] == 0x92 ? time_size(p + 1, left - 1) : 0;
        if (t && is_map_byte(p[1 + t])) {
            is_v2 = 0;
        } else if (left >= 14 && p[0] == 0x92 && p[1] == 0x92 && p[2] == 0xD7 && p[3] == 0) {
            is_v2 = 1;
        } else {
            break;
        }
        if (skip_one(&p, stop, 0)) {
            break;
        }
        *v2 |= is_v2;
        *pos = p - buf;
        ends[n++] = *pos - start;
    }
    return n;
}

static PyObject *entry_ends(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, pos, end, limit;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "entry_ends(buf, start, pos, end, limit)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    pos = PyLong_AsSsize_t(args[2]);
    end = PyLong_AsSsize_t(args[3]);
    limit = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (start < 0 || pos < start || end > view.len || pos > end || limit < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "entry_ends: offsets out of range");
        return NULL;
    }
    /* an entry takes 12 bytes at least: that bounds the array */
    Py_ssize_t most = (end - pos) / 12 + 1;
    if (most > limit) {
        most = limit;
    }
    Py_ssize_t *ends = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)(most > 0 ? most : 1));
    if (ends == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    int v2 = 0;
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = walk((const unsigned char *)view.buf, start, &pos, end, most, ends, &v2);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        PyMem_RawFree(ends);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromSsize_t(ends[i]);
        if (v == NULL) {
            PyMem_RawFree(ends);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    PyMem_RawFree(ends);
    return Py_BuildValue("(NnO)", list, pos, v2 ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"entry_ends", (PyCFunction)(void (*)(void))entry_ends, METH_FASTCALL,
     "entry_ends(buf, start, pos, end, limit) -> (ends relative to start, pos, v2)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire", "The entry scanner's common case in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__wire(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", WIRE_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
