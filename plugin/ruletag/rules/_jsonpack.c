/* JSON lines -> msgpack entries [0, record], for `ruletag match` (part of _native).
 *
 * json_entry(text) gives exactly the bytes msgpack.Packer(use_bin_type=True).pack([0,
 * ujson.loads(text)]) gives, for the JSON texts it takes on: one object of strict JSON
 * (RFC 8259) with integers in msgpack's range, no duplicate keys, no lone surrogates and at
 * most MAX_DEPTH levels. For anything else (floats, other JSON, bad input) it returns None and
 * the caller parses the text with ujson as before, so errors and odd cases keep ujson's
 * behaviour. json_block does the same for the lines of a block, into one buffer, up to the
 * first line it leaves. tests/test_jsonpack.py compares them with ujson + msgpack on
 * generated, damaged and recorded texts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_KEYS 256 /* per object (more: left to ujson): duplicates are looked for pairwise */

typedef struct {
    unsigned char *buf;
    size_t len, cap;
    size_t *keys; /* offset and length of the key bytes of the maps being written */
    size_t nkeys, kcap;
} Out;

static int push_key(Out *o, size_t at, size_t len)
{
    if (o->nkeys + 2 > o->kcap) {
        size_t cap = o->kcap ? o->kcap * 2 : 64;
        size_t *k = PyMem_Realloc(o->keys, cap * sizeof(size_t));
        if (k == NULL) {
            return -1;
        }
        o->keys = k;
        o->kcap = cap;
    }
    o->keys[o->nkeys++] = at;
    o->keys[o->nkeys++] = len;
    return 0;
}

static int grow(Out *o, size_t need)
{
    if (o->len + need <= o->cap) {
        return 0;
    }
    size_t cap = o->cap * 2;
    while (cap < o->len + need) {
        cap *= 2;
    }
    unsigned char *b = PyMem_Realloc(o->buf, cap);
    if (b == NULL) {
        return -1;
    }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static void put_be(unsigned char *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* size of the msgpack header of a str of n bytes (msgpack-python, use_bin_type=True) */
static int str_hdr_size(size_t n)
{
    return n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5;
}

static void write_str_hdr(unsigned char *p, size_t n)
{
    if (n < 32) {
        p[0] = (unsigned char)(0xa0 | n);
    } else if (n < 256) {
        p[0] = 0xd9;
        p[1] = (unsigned char)n;
    } else if (n < 65536) {
        p[0] = 0xda;
        put_be(p + 1, n, 2);
    } else {
        p[0] = 0xdb;
        put_be(p + 1, n, 4);
    }
}

/* header of a map (base 0x80) or array (base 0x90) of n items, 1, 3 or 5 bytes */
static int coll_hdr_size(size_t n)
{
    return n < 16 ? 1 : n < 65536 ? 3 : 5;
}

static void write_coll_hdr(unsigned char *p, size_t n, int is_map)
{
    if (n < 16) {
        p[0] = (unsigned char)((is_map ? 0x80 : 0x90) | n);
    } else if (n < 65536) {
        p[0] = is_map ? 0xde : 0xdc;
        put_be(p + 1, n, 2);
    } else {
        p[0] = is_map ? 0xdf : 0xdd;
        put_be(p + 1, n, 4);
    }
}

/* length of the valid UTF-8 sequence at p (0: invalid, overlong or an encoded surrogate) */
static int utf8_seq(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    size_t left = (size_t)(end - p);
#define CONT(i) (left > (i) && (p[i] & 0xc0) == 0x80)
    if (c >= 0xc2 && c <= 0xdf) {
        return CONT(1) ? 2 : 0;
    }
    if (c >= 0xe0 && c <= 0xef) {
        if (!CONT(1) || !CONT(2)) {
            return 0;
        }
        if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] > 0x9f)) {
            return 0;
        }
        return 3;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        if (!CONT(1) || !CONT(2) || !CONT(3)) {
            return 0;
        }
        if ((c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] > 0x8f)) {
            return 0;
        }
        return 4;
    }
    return 0;
#undef CONT
}

/* bytes a string's plain run stops at: '"', '\\', control characters, non-ASCII */
static unsigned char special[256];

void jsonpack_init(void)
{
    for (int c = 0; c < 256; c++) {
        special[c] = (unsigned char)(c < 0x20 || c == '"' || c == '\\' || c >= 0x80);
    }
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* whether one of the 8 bytes of x is special (the bytes' order does not matter) */
static inline int has_special(uint64_t x)
{
    uint64_t quote = x ^ (ONES * '"'), bslash = x ^ (ONES * '\\');
    uint64_t low = (x - ONES * 0x20) & ~x;           /* high bit set where a byte < 0x20 */
    uint64_t zq = (quote - ONES) & ~quote;           /* ... where a byte == '"' */
    uint64_t zb = (bslash - ONES) & ~bslash;         /* ... where a byte == '\\' */
    return ((low | zq | zb | x) & HIGHS) != 0;       /* x & HIGHS: a byte >= 0x80 */
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c |= 0x20;
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

static long hex4(const unsigned char *p, const unsigned char *end)
{
    if (end - p < 4) {
        return -1;
    }
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) {
            return -1;
        }
        v = (v << 4) | h;
    }
    return v;
}

static size_t put_utf8(unsigned char *q, unsigned long cp)
{
    if (cp < 0x80) {
        q[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        q[0] = (unsigned char)(0xc0 | (cp >> 6));
        q[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        q[0] = (unsigned char)(0xe0 | (cp >> 12));
        q[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        q[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    q[0] = (unsigned char)(0xf0 | (cp >> 18));
    q[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    q[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    q[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

/* The string whose opening quote is just before *pp, as a msgpack str. 0 ok, 1 not taken
 * on (the caller falls back), -1 out of memory. */
static int put_str(Out *o, const unsigned char **pp, const unsigned char *end)
{
    const unsigned char *p = *pp, *q = p;
    int esc = 0;
    for (;;) {
        while (end - q >= 8) { /* eight bytes at a time while none is special */
            uint64_t x;
            memcpy(&x, q, 8);
            if (has_special(x)) {
                break;
            }
            q += 8;
        }
        while (q < end && !special[*q]) {
            q++;
        }
        if (q >= end) {
            return 1;
        }
        unsigned char c = *q;
        if (c == '"') {
            break;
        }
        if (c == '\\') {
            esc = 1;
            q += 2;
            continue;
        }
        if (c < 0x20) {
            return 1;
        }
        int n = utf8_seq(q, end); /* c >= 0x80 */
        if (n == 0) {
            return 1;
        }
        q += n;
    }
    if (q >= end) {
        return 1;
    }
    size_t raw = (size_t)(q - p);
    int hs = str_hdr_size(raw);
    if (grow(o, (size_t)hs + raw) < 0) {
        return -1;
    }
    unsigned char *h = o->buf + o->len;
    if (!esc) {
        write_str_hdr(h, raw);
        memcpy(h + hs, p, raw);
        o->len += (size_t)hs + raw;
        *pp = q + 1;
        return 0;
    }
    /* unescape after a header sized for the raw length (unescaping only shrinks) */
    unsigned char *w = h + hs;
    const unsigned char *r = p;
    while (r < q) {
        const unsigned char *bs = memchr(r, '\\', (size_t)(q - r));
        size_t run = bs == NULL ? (size_t)(q - r) : (size_t)(bs - r);
        memcpy(w, r, run);
        w += run;
        r += run;
        if (r >= q) {
            break;
        }
        unsigned char c = r[1];
        r += 2;
        switch (c) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '/': *w++ = '/'; break;
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            long cp = hex4(r, q);
            if (cp < 0) {
                return 1;
            }
            r += 4;
            if (cp >= 0xdc00 && cp <= 0xdfff) {
                return 1; /* lone low surrogate */
            }
            if (cp >= 0xd800 && cp <= 0xdbff) {
                long lo = (q - r >= 6 && r[0] == '\\' && r[1] == 'u') ? hex4(r + 2, q) : -1;
                if (lo < 0xdc00 || lo > 0xdfff) {
                    return 1; /* lone high surrogate */
                }
                r += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            w += put_utf8(w, (unsigned long)cp);
            break;
        }
        default:
            return 1;
        }
    }
    size_t n = (size_t)(w - (h + hs));
    int ns = str_hdr_size(n);
    if (ns != hs) {
        memmove(h + ns, h + hs, n);
    }
    write_str_hdr(h, n);
    o->len += (size_t)ns + n;
    *pp = q + 1;
    return 0;
}

static int put_int(Out *o, const unsigned char **pp, const unsigned char *end)
{
    const unsigned char *p = *pp;
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') {
        return 1;
    }
    if (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9') {
        return 1; /* leading zero: not JSON */
    }
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) {
            return 1; /* beyond 64 bits */
        }
        v = v * 10 + d;
        p++;
    }
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) {
        return 1; /* a float: left to ujson */
    }
    if (grow(o, 9) < 0) {
        return -1;
    }
    unsigned char *w = o->buf + o->len;
    if (neg && v != 0) {
        if (v > (uint64_t)INT64_MAX + 1) {
            return 1;
        }
        int64_t d = (v == (uint64_t)INT64_MAX + 1) ? INT64_MIN : -(int64_t)v;
        if (d >= -32) {
            w[0] = (unsigned char)(d & 0xff);
            o->len += 1;
        } else if (d >= -128) {
            w[0] = 0xd0;
            w[1] = (unsigned char)(d & 0xff);
            o->len += 2;
        } else if (d >= -32768) {
            w[0] = 0xd1;
            put_be(w + 1, (uint64_t)d, 2);
            o->len += 3;
        } else if (d >= -2147483648LL) {
            w[0] = 0xd2;
            put_be(w + 1, (uint64_t)d, 4);
            o->len += 5;
        } else {
            w[0] = 0xd3;
            put_be(w + 1, (uint64_t)d, 8);
            o->len += 9;
        }
    } else if (v < 128) {
        w[0] = (unsigned char)v;
        o->len += 1;
    } else if (v < 256) {
        w[0] = 0xcc;
        w[1] = (unsigned char)v;
        o->len += 2;
    } else if (v < 65536) {
        w[0] = 0xcd;
        put_be(w + 1, v, 2);
        o->len += 3;
    } else if (v < 4294967296ULL) {
        w[0] = 0xce;
        put_be(w + 1, v, 4);
        o->len += 5;
    } else {
        w[0] = 0xcf;
        put_be(w + 1, v, 8);
        o->len += 9;
    }
    *pp = p;
    return 0;
}

static const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static int put_value(Out *o, const unsigned char **pp, const unsigned char *end, int depth);

/* The object or array whose opening bracket is at *pp: its header is written once its items
 * are counted (room for 3 bytes is kept, the items moved when it needs 1 or 5). */
static int put_coll(Out *o, const unsigned char **pp, const unsigned char *end, int depth)
{
    int is_map = **pp == '{';
    unsigned char close = is_map ? '}' : ']';
    if (depth >= MAX_DEPTH) {
        return 1;
    }
    if (grow(o, 3) < 0) {
        return -1;
    }
    size_t at = o->len;
    o->len += 3;
    size_t base = o->nkeys; /* this map's keys are pushed from here */
    uint64_t seen[4] = {0, 0, 0, 0}; /* a 256-bit filter of its keys' hashes */
    size_t n = 0;
    const unsigned char *p = skip_ws(*pp + 1, end);
    int rc;
    if (p < end && *p == close) {
        p++;
    } else {
        for (;;) {
            if (is_map) {
                if (p >= end || *p != '"') {
                    return 1;
                }
                if (n >= MAX_KEYS) {
                    return 1;
                }
                p++;
                size_t kat = o->len;
                if ((rc = put_str(o, &p, end)) != 0) {
                    return rc;
                }
                unsigned char k0 = o->buf[kat];
                size_t kh = k0 == 0xd9 ? 2 : k0 == 0xda ? 3 : k0 == 0xdb ? 5 : 1;
                size_t klen = o->len - kat - kh;
                const unsigned char *kb = o->buf + kat + kh;
                unsigned h = (unsigned)(klen * 31u) & 255u;
                if (klen) {
                    h = (h + kb[0] * 7u + kb[klen / 2] * 13u + kb[klen - 1]) & 255u;
                }
                if (seen[h >> 6] & (1ULL << (h & 63))) { /* maybe seen: compare */
                    for (size_t i = base; i < o->nkeys; i += 2) {
                        if (o->keys[i + 1] == klen && memcmp(o->buf + o->keys[i], kb, klen) == 0) {
                            return 1; /* duplicate key: ujson keeps the last value */
                        }
                    }
                }
                seen[h >> 6] |= 1ULL << (h & 63);
                if (push_key(o, kat + kh, klen) < 0) {
                    return -1;
                }
                p = skip_ws(p, end);
                if (p >= end || *p != ':') {
                    return 1;
                }
                p = skip_ws(p + 1, end);
            }
            if ((rc = put_value(o, &p, end, depth + 1)) != 0) {
                return rc;
            }
            n++;
            p = skip_ws(p, end);
            if (p < end && *p == ',') {
                p = skip_ws(p + 1, end);
                continue;
            }
            if (p < end && *p == close) {
                p++;
                break;
            }
            return 1;
        }
    }
    o->nkeys = base;
    int hs = coll_hdr_size(n);
    if (hs != 3) {
        size_t body = o->len - at - 3;
        if (hs > 3 && grow(o, 2) < 0) {
            return -1;
        }
        memmove(o->buf + at + hs, o->buf + at + 3, body);
        o->len = at + (size_t)hs + body;
    }
    write_coll_hdr(o->buf + at, n, is_map);
    *pp = p;
    return 0;
}

static int put_word(Out *o, const unsigned char **pp, const unsigned char *end, const char *word,
                    unsigned char code)
{
    size_t n = strlen(word);
    if ((size_t)(end - *pp) < n || memcmp(*pp, word, n) != 0) {
        return 1;
    }
    if (grow(o, 1) < 0) {
        return -1;
    }
    o->buf[o->len++] = code;
    *pp += n;
    return 0;
}

static int put_value(Out *o, const unsigned char **pp, const unsigned char *end, int depth)
{
    const unsigned char *p = *pp;
    if (p >= end) {
        return 1;
    }
    switch (*p) {
    case '{':
    case '[':
        return put_coll(o, pp, end, depth);
    case '"':
        *pp = p + 1;
        return put_str(o, pp, end);
    case 't':
        return put_word(o, pp, end, "true", 0xc3);
    case 'f':
        return put_word(o, pp, end, "false", 0xc2);
    case 'n':
        return put_word(o, pp, end, "null", 0xc0);
    default:
        return put_int(o, pp, end);
    }
}

/* one entry [0, record] for the JSON text [p, end) appended to o: 0, 1 (left to ujson, o
 * unchanged) or -1 (out of memory) */
static int put_entry(Out *o, const unsigned char *p, const unsigned char *end)
{
    size_t at = o->len;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') {
        return 1;
    }
    if (grow(o, 2) < 0) {
        return -1;
    }
    o->buf[o->len++] = 0x92;
    o->buf[o->len++] = 0x00;
    o->nkeys = 0;
    int rc = put_coll(o, &p, end, 0);
    if (rc == 0 && skip_ws(p, end) != end) {
        rc = 1; /* trailing data */
    }
    if (rc != 0) {
        o->len = at;
    }
    return rc;
}

static int init_out(Out *o, size_t cap)
{
    o->cap = cap;
    o->len = 0;
    o->keys = NULL;
    o->nkeys = o->kcap = 0;
    o->buf = PyMem_Malloc(cap);
    return o->buf == NULL ? -1 : 0;
}

PyObject *json_entry(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *p = view.buf;
    PyObject *res = NULL;
    Out o;
    if (init_out(&o, (size_t)view.len + 64) < 0) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    int rc = put_entry(&o, p, p + view.len);
    if (rc < 0) {
        PyErr_NoMemory();
    } else if (rc > 0) {
        Py_INCREF(Py_None);
        res = Py_None;
    } else {
        res = PyBytes_FromStringAndSize((const char *)o.buf, (Py_ssize_t)o.len);
    }
    PyMem_Free(o.buf);
    PyMem_Free(o.keys);
    PyBuffer_Release(&view);
    return res;
}

/* bytes.strip()'s whitespace */
static int strip_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

PyObject *json_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_ssize_t start, stop, most, base;
    if (nargs != 5 || (start = PyLong_AsSsize_t(args[1])) == -1 ||
        (stop = PyLong_AsSsize_t(args[2])) == -1 || (most = PyLong_AsSsize_t(args[3])) == -1 ||
        (base = PyLong_AsSsize_t(args[4])) == -1) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "json_block(data, start, end, most, base)");
        }
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *spans = NULL, *lines = NULL, *res = NULL;
    Out o;
    o.buf = NULL;
    o.keys = NULL;
    if (start < 0 || stop > view.len || start > stop) {
        PyErr_SetString(PyExc_ValueError, "json_block: bad span");
        goto done;
    }
    if (init_out(&o, (size_t)(stop - start) + 64) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    spans = PyList_New(0);
    lines = PyList_New(0);
    if (spans == NULL || lines == NULL) {
        goto done;
    }
    const unsigned char *data = view.buf, *p = data + start, *end = data + stop;
    Py_ssize_t nlines = 0, taken = 0;
    while (p < end && taken < most) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *le = nl == NULL ? end : nl, *ts = p, *te = le;
        while (ts < te && strip_ws(*ts)) {
            ts++;
        }
        while (te > ts && strip_ws(te[-1])) {
            te--;
        }
        if (ts < te) {
            size_t at = o.len;
            int rc = put_entry(&o, ts, te);
            if (rc < 0) {
                PyErr_NoMemory();
                goto done;
            }
            if (rc > 0) {
                break; /* this line is the caller's */
            }
            PyObject *span = Py_BuildValue("(nn)", base + (Py_ssize_t)at, base + (Py_ssize_t)o.len);
            PyObject *text = PyBytes_FromStringAndSize((const char *)ts, te - ts);
            if (span == NULL || text == NULL || PyList_Append(spans, span) < 0 ||
                PyList_Append(lines, text) < 0) {
                Py_XDECREF(span);
                Py_XDECREF(text);
                goto done;
            }
            Py_DECREF(span);
            Py_DECREF(text);
            taken++;
        }
        nlines++;
        p = nl == NULL ? end : nl + 1;
    }
    PyObject *entries = PyBytes_FromStringAndSize((const char *)o.buf, (Py_ssize_t)o.len);
    if (entries != NULL) {
        res = Py_BuildValue("(NOOnn)", entries, spans, lines, nlines, (Py_ssize_t)(p - data));
    }
done:
    Py_XDECREF(spans);
    Py_XDECREF(lines);
    PyMem_Free(o.buf);
    PyMem_Free(o.keys);
    PyBuffer_Release(&view);
    return res;
}
