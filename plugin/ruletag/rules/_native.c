/*
 * ruletag.rules._native: the matcher's per-record helpers in C.
 *
 * Optional: ruletag.rules.native picks these when this module is built, and the pure-Python
 * reference implementations (the same names there) otherwise or under RULETAG_PURE_PYTHON=1.
 * Every function here has the exact semantics of its reference; tests/test_native.py checks
 * them against each other.
 *
 *   flatten_record(record) -> {dotted path: [values]}     (reference: fields._py_flatten_record)
 *   Adder(hits, only=None)       Hyperscan match handler: hits.add(id) [if id in only]
 *   EntryHits(spans)             Hyperscan match handler over a chunk: .per_entry {k: {ids}}
 *   scan_cached(key, values, hits, cache, miss, limit, max_entries)
 *                                (reference: matcher.table.py_scan_cached)
 *   scan_groups(todo, spec, view, flat, vcache, hits, cache, limit, max_entries)
 *                                (reference: matcher.table.py_scan_groups)
 *   ViewBase(fieldmap, record)   RecordView's state and values(field) (reference:
 *                                fields.PyRecordView; fields.RecordView subclasses this)
 *   holding(rules, programs, hits, lazy, view, cache) -> [the rules whose formula holds]
 *                                (reference: the generated formula functions, see
 *                                matcher.table.Matcher._holding and compiler.codegen)
 *   LazyLeaf(kind, field, want, op, fallback)
 *                                a lazy leaf (view, cache) -> bool: Exists, IsNull, Equals,
 *                                Compare, FieldRef (reference: matcher.leaves.py_lazy_fn)
 *   follow_triggers(per_entry, triggered, fire_sets, out) -> [(k, key), ...]
 *                                the tuned pre-filter's pass over the triggered entries
 *                                (reference: matcher.prefilter.py_follow_triggers)
 *   evaluate(ctx, view, rules, groups) -> scan_groups then holding, in one call
 *                                (reference: matcher.table.Matcher._evaluate)
 *   PathTable(paths)             the dotted paths a table reads, by their bytes
 *   flat_of(paths, data, unpackb) -> flatten_record(unpackb(data)) at those paths, read from
 *                                the bytes, or None (reference: matcher.table.py_flat_of)
 *   match_loop(todo, cands, plans, make_plan, entries, spans, records, view_type, fieldmap,
 *              own_eval, cold, unpackb, decode, out, paths)
 *                                match_entries' loop over the entries (reference:
 *                                matcher.table.Matcher._match_loop)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *Mapping = NULL; /* collections.abc.Mapping */

/* Interned attribute and method names (made once in PyInit__native). */
static PyObject *s_dotted, *s_spec, *s_values, *s_lower, *s_plan, *s_plans, *s_ecs_category,
    *s_ecs_type, *s_isdisjoint;
/* Made once in PyInit__native too: unpackb's keyword names ("raw", "unicode_errors",
 * "strict_map_key"), the int 1 the counters add, and "surrogateescape". */
static PyObject *unpack_kwnames, *one, *s_surrogateescape;

/* ------------------------------------------------------------------ flatten_record */

static int is_scalar(PyObject *v)
{
    return PyUnicode_Check(v) || PyLong_Check(v) || PyFloat_Check(v) || PyBytes_Check(v);
}

/* _flatten: append the non-null leaves of v (lists and tuples flattened) to out. */
static int flatten_values(PyObject *v, PyObject *out)
{
    if (PyList_Check(v) || PyTuple_Check(v)) {
        if (Py_EnterRecursiveCall(" while flattening a record")) {
            return -1;
        }
        PyObject *seq = PySequence_Fast(v, "list or tuple expected");
        if (seq == NULL) {
            Py_LeaveRecursiveCall();
            return -1;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        int rc = 0;
        for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
            rc = flatten_values(PySequence_Fast_GET_ITEM(seq, i), out);
        }
        Py_DECREF(seq);
        Py_LeaveRecursiveCall();
        return rc;
    }
    if (v == Py_None) {
        return 0;
    }
    return PyList_Append(out, v);
}

static int flat_map(PyObject *obj, PyObject *prefix, PyObject *out);

/* Append one value to out[path]. */
static int add_one(PyObject *out, PyObject *path, PyObject *v)
{
    PyObject *got = PyDict_GetItemWithError(out, path); /* borrowed */
    if (got != NULL) {
        return PyList_Append(got, v);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    PyObject *lst = PyList_New(1);
    if (lst == NULL) {
        return -1;
    }
    Py_INCREF(v);
    PyList_SET_ITEM(lst, 0, v);
    int rc = PyDict_SetItem(out, path, lst);
    Py_DECREF(lst);
    return rc;
}

/* isinstance(v, collections.abc.Mapping): dicts and the exact scalar and sequence types a
 * decoded record holds are answered here (the ABC check costs a Python-level call). */
static int is_mapping(PyObject *v)
{
    if (PyDict_Check(v)) {
        return 1;
    }
    if (v == Py_None || PyUnicode_CheckExact(v) || PyLong_CheckExact(v) || PyBool_Check(v) ||
        PyFloat_CheckExact(v) || PyBytes_CheckExact(v) || PyList_CheckExact(v) ||
        PyTuple_CheckExact(v)) {
        return 0;
    }
    return PyObject_IsInstance(v, Mapping);
}

/* _flat_list: walk into the mappings of a list (and of nested lists) below path. */
static int flat_list(PyObject *items, PyObject *path, PyObject *out)
{
    if (Py_EnterRecursiveCall(" while flattening a record")) {
        return -1;
    }
    PyObject *seq = PySequence_Fast(items, "list or tuple expected");
    if (seq == NULL) {
        Py_LeaveRecursiveCall();
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(seq, i);
        int m = is_mapping(e);
        if (m < 0) {
            rc = -1;
        } else if (m) {
            rc = flat_map(e, path, out);
        } else if (PyList_Check(e) || PyTuple_Check(e)) {
            rc = flat_list(e, path, out);
        }
    }
    Py_DECREF(seq);
    Py_LeaveRecursiveCall();
    return rc;
}

/* The value v at the dotted path ``path`` into out (what flatten_record does for one key). */
static int flat_at(PyObject *path, PyObject *v, PyObject *out)
{
    int rc;
    if (v == Py_None) {
        return 0;
    }
    if (is_scalar(v)) {
        rc = add_one(out, path, v);
    } else if (PyList_Check(v) || PyTuple_Check(v)) {
        PyObject *vals = PyList_New(0);
        rc = vals == NULL ? -1 : flatten_values(v, vals);
        if (rc == 0 && PyList_GET_SIZE(vals) > 0) {
            PyObject *got = PyDict_GetItemWithError(out, path); /* borrowed */
            if (got != NULL) {
                rc = PyList_SetSlice(got, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, vals);
            } else if (PyErr_Occurred()) {
                rc = -1;
            } else {
                rc = PyDict_SetItem(out, path, vals);
            }
            if (rc == 0) {
                rc = flat_list(v, path, out);
            }
        }
        Py_XDECREF(vals);
    } else {
        rc = add_one(out, path, v);
        if (rc == 0) {
            int m = is_mapping(v);
            if (m < 0) {
                rc = -1;
            } else if (m) {
                rc = flat_map(v, path, out);
            }
        }
    }
    return rc;
}

/* One key of a map: dotted is the map's path followed by a dot (NULL at the top). */
static int flat_item(PyObject *k, PyObject *v, PyObject *dotted, PyObject *out)
{
    if (v == Py_None || !PyUnicode_CheckExact(k)) {
        return 0;
    }
    PyObject *path;
    if (dotted == NULL) {
        Py_INCREF(k);
        path = k;
    } else {
        path = PyUnicode_Concat(dotted, k);
        if (path == NULL) {
            return -1;
        }
    }
    int rc = flat_at(path, v, out);
    Py_DECREF(path);
    return rc;
}

static int flat_map(PyObject *obj, PyObject *prefix, PyObject *out)
{
    if (Py_EnterRecursiveCall(" while flattening a record")) {
        return -1;
    }
    PyObject *dotted = NULL; /* "prefix." once per map, not per key */
    if (prefix != NULL) {
        static PyObject *dot = NULL;
        if (dot == NULL && (dot = PyUnicode_InternFromString(".")) == NULL) {
            Py_LeaveRecursiveCall();
            return -1;
        }
        if ((dotted = PyUnicode_Concat(prefix, dot)) == NULL) {
            Py_LeaveRecursiveCall();
            return -1;
        }
    }
    int rc = 0;
    if (PyDict_CheckExact(obj)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (rc == 0 && PyDict_Next(obj, &pos, &k, &v)) {
            Py_INCREF(k);
            Py_INCREF(v);
            rc = flat_item(k, v, dotted, out);
            Py_DECREF(k);
            Py_DECREF(v);
        }
    } else {
        /* any other Mapping: its items(), as the reference does */
        PyObject *items = PyMapping_Items(obj);
        if (items == NULL) {
            rc = -1;
        } else {
            Py_ssize_t n = PyList_GET_SIZE(items);
            for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
                PyObject *kv = PyList_GET_ITEM(items, i);
                if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
                    PyErr_SetString(PyExc_TypeError, "items() must give (key, value) pairs");
                    rc = -1;
                    break;
                }
                rc = flat_item(PyTuple_GET_ITEM(kv, 0), PyTuple_GET_ITEM(kv, 1), dotted, out);
            }
            Py_DECREF(items);
        }
    }
    Py_XDECREF(dotted);
    Py_LeaveRecursiveCall();
    return rc;
}

static PyObject *flatten_record(PyObject *self, PyObject *obj)
{
    PyObject *out = PyDict_New();
    if (out == NULL) {
        return NULL;
    }
    if (flat_map(obj, NULL, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* ------------------------------------------------------------------ PathTable, flat_of */

/* A record's flattened values read straight from its msgpack bytes, for the dotted paths a
 * table reads only: no dict of the record is built, no text of a key, nor any value at a
 * path nothing reads. PathTable(paths) holds those paths ({path: flags}, P_WANTED: its
 * values are read; P_PREFIX: some wanted path continues below it) in a hash table keyed by
 * their UTF-8 bytes (surrogateescape, as records are decoded), so a key's path is looked up
 * without making a text of it. flat_of gives what flatten_record(unpackb(data)) holds at
 * the wanted paths, or None where it does not decide exactly (a repeated key, an extension
 * type, non-text keys of a container type, depth, bytes msgpack would refuse): the caller
 * then decodes the record as before. */

enum { P_WANTED = 1, P_PREFIX = 2 };
#define WALK_DEPTH 64   /* deeper records are left to the full decoding */
#define WALK_KEYS 256   /* keys of one map on a wanted path, for the repeated-key check */
#define WALK_PATH 1024  /* the longest path looked up */

typedef struct {
    uint64_t hash;
    char *key; /* the path's bytes (owned), NULL: an empty slot */
    Py_ssize_t len;
    PyObject *path; /* the path as text */
    int flags;
} PathSlot;

typedef struct {
    PyObject_HEAD
    PathSlot *slots;
    Py_ssize_t mask; /* capacity - 1, a power of two minus one */
    Py_ssize_t maxlen;
    PyObject *covered; /* frozenset of the wanted paths flat_of reports exactly */
    PyObject *plans;   /* field -> (dotted, spec) of its plan, for the fields whose dotted
                        * paths are all covered (a view made by flat_of reads them so) */
} PathTable;

static uint64_t path_hash(const char *p, Py_ssize_t n)
{
    uint64_t h = 14695981039346656037ULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    }
    return h;
}

static PathSlot *path_find(PathTable *t, const char *p, Py_ssize_t n)
{
    if (t->slots == NULL || n > t->maxlen) {
        return NULL;
    }
    uint64_t h = path_hash(p, n);
    for (Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)t->mask);; i = (i + 1) & t->mask) {
        PathSlot *s = &t->slots[i];
        if (s->key == NULL) {
            return NULL;
        }
        if (s->hash == h && s->len == n && memcmp(s->key, p, (size_t)n) == 0) {
            return s;
        }
    }
}

static void PathTable_free_slots(PathTable *self)
{
    if (self->slots != NULL) {
        for (Py_ssize_t i = 0; i <= self->mask; i++) {
            PyMem_Free(self->slots[i].key);
            Py_XDECREF(self->slots[i].path);
        }
        PyMem_Free(self->slots);
        self->slots = NULL;
    }
}

static int PathTable_init(PathTable *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"paths", "plans", NULL};
    PyObject *paths, *plans = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|O!", kwlist, &PyDict_Type, &paths,
                                     &PyDict_Type, &plans)) {
        return -1;
    }
    PathTable_free_slots(self);
    Py_CLEAR(self->covered);
    Py_CLEAR(self->plans);
    Py_ssize_t cap = 8;
    while (cap < 2 * PyDict_GET_SIZE(paths) + 2) {
        cap *= 2;
    }
    self->slots = PyMem_Calloc((size_t)cap, sizeof(PathSlot));
    PyObject *covered = PySet_New(NULL);
    if (self->slots == NULL || covered == NULL) {
        Py_XDECREF(covered);
        PyErr_NoMemory();
        return -1;
    }
    self->mask = cap - 1;
    self->maxlen = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(paths, &pos, &k, &v)) {
        long flags = PyLong_Check(v) ? PyLong_AsLong(v) : -1;
        if (!PyUnicode_CheckExact(k) || flags < 1 || flags > 3) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "paths: {dotted path: flags 1, 2 or 3}");
            }
            Py_DECREF(covered);
            return -1;
        }
        PyObject *b = PyUnicode_AsEncodedString(k, "utf-8", "surrogateescape");
        if (b == NULL) { /* a text no record's key decodes to: never found, not covered */
            if (!PyErr_ExceptionMatches(PyExc_UnicodeError)) {
                Py_DECREF(covered);
                return -1;
            }
            PyErr_Clear();
            continue;
        }
        const char *p = PyBytes_AS_STRING(b);
        Py_ssize_t n = PyBytes_GET_SIZE(b);
        if (n > WALK_PATH) { /* never looked up: not covered */
            Py_DECREF(b);
            continue;
        }
        uint64_t h = path_hash(p, n);
        Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)self->mask);
        while (self->slots[i].key != NULL) {
            i = (i + 1) & self->mask;
        }
        PathSlot *s = &self->slots[i];
        s->key = PyMem_Malloc(n > 0 ? (size_t)n : 1);
        if (s->key == NULL) {
            Py_DECREF(b);
            Py_DECREF(covered);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(s->key, p, (size_t)n);
        Py_DECREF(b);
        s->hash = h;
        s->len = n;
        s->flags = (int)flags;
        Py_INCREF(k);
        s->path = k;
        if (n > self->maxlen) {
            self->maxlen = n;
        }
        if ((flags & P_WANTED) && PySet_Add(covered, k) < 0) {
            Py_DECREF(covered);
            return -1;
        }
    }
    self->covered = PyFrozenSet_New(covered);
    Py_DECREF(covered);
    if (self->covered == NULL || (self->plans = PyDict_New()) == NULL) {
        return -1;
    }
    pos = 0;
    while (plans != NULL && PyDict_Next(plans, &pos, &k, &v)) {
        if (!PyUnicode_Check(k) || !PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2 ||
            !PyTuple_Check(PyTuple_GET_ITEM(v, 0)) || !PyTuple_Check(PyTuple_GET_ITEM(v, 1))) {
            PyErr_SetString(PyExc_TypeError, "plans: {field: (dotted tuple, spec tuple)}");
            return -1;
        }
        PyObject *dotted = PyTuple_GET_ITEM(v, 0);
        int all = 1;
        for (Py_ssize_t i = 0; all == 1 && i < PyTuple_GET_SIZE(dotted); i++) {
            all = PySet_Contains(self->covered, PyTuple_GET_ITEM(dotted, i));
        }
        if (all < 0 || (all == 1 && PyDict_SetItem(self->plans, k, v) < 0)) {
            return -1;
        }
    }
    return 0;
}

static int PathTable_traverse(PathTable *self, visitproc visit, void *arg)
{
    Py_VISIT(self->covered);
    Py_VISIT(self->plans);
    return 0;
}

static int PathTable_clear(PathTable *self)
{
    Py_CLEAR(self->covered);
    Py_CLEAR(self->plans);
    return 0;
}

static void PathTable_dealloc(PathTable *self)
{
    PyObject_GC_UnTrack(self);
    PathTable_clear(self);
    PathTable_free_slots(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef PathTable_members[] = {
    {"covered", T_OBJECT, offsetof(PathTable, covered), READONLY,
     "the wanted paths (frozenset) whose values flat_of gives exactly"},
    {"plans", T_OBJECT, offsetof(PathTable, plans), READONLY,
     "field -> (dotted, spec), for the fields whose dotted paths are all covered"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject PathTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ruletag.rules._native.PathTable",
    .tp_basicsize = sizeof(PathTable),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "PathTable(paths): the dotted paths flat_of reads ({path: 1 wanted, 2 prefix, 3 "
              "both}).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PathTable_init,
    .tp_traverse = (traverseproc)PathTable_traverse,
    .tp_clear = (inquiry)PathTable_clear,
    .tp_dealloc = (destructor)PathTable_dealloc,
    .tp_members = PathTable_members,
};

/* A walk over one record's bytes. */
typedef struct {
    PathTable *t;
    PyObject *flat;    /* the result */
    PyObject *whole;   /* a memoryview the bytes are a part of, for unpackb's slices */
    const unsigned char *base; /* whole's first byte */
    PyObject *unpackb;
    char path[WALK_PATH];
} Walk;

enum { WK_OK = 0, WK_UNSURE = 1, WK_ERROR = -1 };

static uint64_t be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* The header of the msgpack object at *p: its kind ('s' str, 'b' bin, 'm' map, 'a' array,
 * 'n' nil, 'x' ext, 'v' any other scalar), *len (str/bin: bytes; map/array: items), *hl
 * (the header's length). 0, or 1 if malformed or cut short. */
static int mp_head(const unsigned char *p, const unsigned char *end, char *kind, uint64_t *len,
                   Py_ssize_t *hl)
{
    Py_ssize_t left = end - p;
    if (left < 1) {
        return 1;
    }
    unsigned char c = p[0];
    int w = 0; /* width of a length field */
    *hl = 1;
    *len = 0;
    if (c < 0x80 || c >= 0xE0 || c == 0xC2 || c == 0xC3) {
        *kind = 'v';
        return 0;
    }
    if (c <= 0x8F) {
        *kind = 'm';
        *len = c & 0x0F;
        return 0;
    }
    if (c <= 0x9F) {
        *kind = 'a';
        *len = c & 0x0F;
        return 0;
    }
    if (c <= 0xBF) {
        *kind = 's';
        *len = c & 0x1F;
        return 0;
    }
    switch (c) {
    case 0xC0: *kind = 'n'; return 0;
    case 0xC4: case 0xC5: case 0xC6: *kind = 'b'; w = 1 << (c - 0xC4); break;
    case 0xD9: case 0xDA: case 0xDB: *kind = 's'; w = 1 << (c - 0xD9); break;
    case 0xDC: case 0xDD: *kind = 'a'; w = 2 << (c - 0xDC); break;
    case 0xDE: case 0xDF: *kind = 'm'; w = 2 << (c - 0xDE); break;
    case 0xCA: case 0xCE: case 0xD2: *kind = 'v'; *hl = 5; return left < 5;
    case 0xCB: case 0xCF: case 0xD3: *kind = 'v'; *hl = 9; return left < 9;
    case 0xCC: case 0xD0: *kind = 'v'; *hl = 2; return left < 2;
    case 0xCD: case 0xD1: *kind = 'v'; *hl = 3; return left < 3;
    default: *kind = 'x'; return 0; /* 0xC1 (never used), ext and fixext */
    }
    if (left < 1 + w) {
        return 1;
    }
    *len = be(p + 1, w);
    *hl = 1 + w;
    return 0;
}

/* Past the object at c->p (*p moved to its end). WK_OK, or WK_UNSURE (malformed, cut short,
 * an extension type, too deep). */
static int mp_skip(const unsigned char **p, const unsigned char *end, int depth)
{
    char kind;
    uint64_t len;
    Py_ssize_t hl;
    if (depth > WALK_DEPTH || mp_head(*p, end, &kind, &len, &hl)) {
        return WK_UNSURE;
    }
    *p += hl;
    switch (kind) {
    case 's': case 'b':
        if (len > (uint64_t)(end - *p)) {
            return WK_UNSURE;
        }
        *p += len;
        return WK_OK;
    case 'm': case 'a': {
        uint64_t n = kind == 'm' ? 2 * len : len;
        if (n > (uint64_t)(end - *p)) {
            return WK_UNSURE; /* each item takes a byte at least */
        }
        for (uint64_t i = 0; i < n; i++) {
            if (kind == 'm' && i % 2 == 0) { /* a key: one unpackb may refuse (unhashable)? */
                char k;
                uint64_t kl;
                Py_ssize_t khl;
                if (mp_head(*p, end, &k, &kl, &khl) || k == 'm' || k == 'a' || k == 'x') {
                    return WK_UNSURE;
                }
            }
            if (mp_skip(p, end, depth + 1) != WK_OK) {
                return WK_UNSURE;
            }
        }
        return WK_OK;
    }
    case 'x':
        return WK_UNSURE;
    default:
        return WK_OK;
    }
}

/* The scalar at p (kind 'v', 's' or 'b' from mp_head) as msgpack.unpackb gives it (texts
 * decoded with surrogateescape, bin as bytes). A new reference, or NULL with an exception. */
static PyObject *mp_scalar(const unsigned char *p, char kind, uint64_t len, Py_ssize_t hl)
{
    if (kind == 's') {
        return PyUnicode_DecodeUTF8((const char *)p + hl, (Py_ssize_t)len, "surrogateescape");
    }
    if (kind == 'b') {
        return PyBytes_FromStringAndSize((const char *)p + hl, (Py_ssize_t)len);
    }
    unsigned char c = p[0];
    if (c < 0x80) {
        return PyLong_FromLong(c);
    }
    if (c >= 0xE0) {
        return PyLong_FromLong((long)(signed char)c);
    }
    switch (c) {
    case 0xC2: Py_RETURN_FALSE;
    case 0xC3: Py_RETURN_TRUE;
    case 0xCA: {
        uint32_t u = (uint32_t)be(p + 1, 4);
        float f;
        memcpy(&f, &u, 4);
        return PyFloat_FromDouble((double)f);
    }
    case 0xCB: {
        uint64_t u = be(p + 1, 8);
        double d;
        memcpy(&d, &u, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xCC: case 0xCD: case 0xCE: case 0xCF:
        return PyLong_FromUnsignedLongLong(be(p + 1, 1 << (c - 0xCC)));
    case 0xD0: return PyLong_FromLong((long)(int8_t)be(p + 1, 1));
    case 0xD1: return PyLong_FromLong((long)(int16_t)be(p + 1, 2));
    case 0xD2: return PyLong_FromLong((long)(int32_t)be(p + 1, 4));
    case 0xD3: return PyLong_FromLongLong((long long)(int64_t)be(p + 1, 8));
    default:
        PyErr_SetString(PyExc_ValueError, "not a msgpack scalar");
        return NULL;
    }
}

/* The object whole[s:e] decoded by unpackb, given to flat_at at ``path``. WK_OK, WK_UNSURE
 * (unpackb refused it: left to the full decoding), or WK_ERROR. */
static int walk_decoded(Walk *w, PyObject *path, const unsigned char *s, const unsigned char *e)
{
    PyObject *mv = PySequence_GetSlice(w->whole, s - w->base, e - w->base);
    if (mv == NULL) {
        return WK_ERROR;
    }
    PyObject *args[4] = {mv, Py_False, s_surrogateescape, Py_False};
    PyObject *v = PyObject_Vectorcall(w->unpackb, args, 1, unpack_kwnames);
    Py_DECREF(mv);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return WK_ERROR;
        }
        PyErr_Clear();
        return WK_UNSURE;
    }
    int rc = flat_at(path, v, w->flat);
    Py_DECREF(v);
    return rc < 0 ? WK_ERROR : WK_OK;
}

/* The array v..end_v (its header at v), when it holds scalars and nils only: if ``add`` (a
 * wanted path), its non-null values appended to flat[path] as flat_at does (a list of
 * scalars has no paths below it). WK_OK; WK_UNSURE when it holds anything else (then left to
 * walk_decoded, with nothing added); WK_ERROR. */
static int walk_scalars(Walk *w, PyObject *path, const unsigned char *v, const unsigned char *end_v,
                        int add)
{
    char kind;
    uint64_t n, len;
    Py_ssize_t hl;
    if (mp_head(v, end_v, &kind, &n, &hl) || kind != 'a') {
        return WK_UNSURE;
    }
    const unsigned char *items = v + hl, *q = items;
    for (uint64_t i = 0; i < n; i++) { /* a first pass: only scalars? */
        if (mp_head(q, end_v, &kind, &len, &hl) || kind == 'm' || kind == 'a' || kind == 'x') {
            return WK_UNSURE;
        }
        q += hl + ((kind == 's' || kind == 'b') ? (Py_ssize_t)len : 0);
    }
    if (!add) {
        return WK_OK;
    }
    PyObject *got = PyDict_GetItemWithError(w->flat, path); /* borrowed */
    if (got == NULL && PyErr_Occurred()) {
        return WK_ERROR;
    }
    PyObject *vals = got != NULL ? got : PyList_New(0);
    if (vals == NULL) {
        return WK_ERROR;
    }
    Py_ssize_t before = PyList_GET_SIZE(vals);
    int rc = WK_OK;
    q = items;
    for (uint64_t i = 0; i < n && rc == WK_OK; i++) {
        mp_head(q, end_v, &kind, &len, &hl);
        if (kind != 'n') {
            PyObject *o = mp_scalar(q, kind, len, hl);
            if (o == NULL || PyList_Append(vals, o) < 0) {
                rc = WK_ERROR;
            }
            Py_XDECREF(o);
        }
        q += hl + ((kind == 's' || kind == 'b') ? (Py_ssize_t)len : 0);
    }
    if (rc == WK_OK && got == NULL && PyList_GET_SIZE(vals) > before &&
        PyDict_SetItem(w->flat, path, vals) < 0) {
        rc = WK_ERROR;
    }
    if (got == NULL) {
        Py_DECREF(vals);
    }
    return rc;
}

/* The map at *p, whose path is w->path[:plen] (0: the record itself). */
static int walk_map(Walk *w, const unsigned char **p, const unsigned char *end, Py_ssize_t plen,
                    int depth)
{
    char kind;
    uint64_t n;
    Py_ssize_t hl;
    if (depth > WALK_DEPTH || mp_head(*p, end, &kind, &n, &hl) || kind != 'm' ||
        n > (uint64_t)(end - *p)) {
        return WK_UNSURE;
    }
    *p += hl;
    const unsigned char *seen[WALK_KEYS]; /* the keys found in the table so far */
    Py_ssize_t seen_len[WALK_KEYS];
    int nseen = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t klen;
        if (mp_head(*p, end, &kind, &klen, &hl)) {
            return WK_UNSURE;
        }
        if (kind != 's') { /* flatten_record skips keys that are not texts */
            if (kind == 'm' || kind == 'a' || kind == 'x' || mp_skip(p, end, depth + 1) ||
                mp_skip(p, end, depth + 1)) {
                return WK_UNSURE; /* a key unpackb may refuse (unhashable) */
            }
            continue;
        }
        const unsigned char *key = *p + hl;
        if (klen > (uint64_t)(end - key)) {
            return WK_UNSURE;
        }
        *p = key + klen;
        Py_ssize_t len = plen + (plen > 0) + (Py_ssize_t)klen;
        PathSlot *slot = NULL;
        if (len <= w->t->maxlen) {
            if (plen > 0) {
                w->path[plen] = '.';
            }
            memcpy(w->path + plen + (plen > 0), key, (size_t)klen);
            slot = path_find(w->t, w->path, len);
        }
        if (slot == NULL) {
            if (mp_skip(p, end, depth + 1)) {
                return WK_UNSURE;
            }
            continue;
        }
        for (int j = 0; j < nseen; j++) {
            if (seen_len[j] == (Py_ssize_t)klen && memcmp(seen[j], key, (size_t)klen) == 0) {
                return WK_UNSURE; /* the last value would win: left to unpackb */
            }
        }
        if (nseen == WALK_KEYS) {
            return WK_UNSURE;
        }
        seen[nseen] = key;
        seen_len[nseen++] = (Py_ssize_t)klen;
        const unsigned char *v = *p;
        uint64_t vlen;
        if (mp_head(v, end, &kind, &vlen, &hl)) {
            return WK_UNSURE;
        }
        int rc = WK_OK;
        if (kind == 'm' && !(slot->flags & P_WANTED)) {
            rc = walk_map(w, p, end, len, depth + 1); /* only paths below it are read */
        } else {
            if (mp_skip(p, end, depth + 1)) {
                return WK_UNSURE;
            }
            if (kind == 'n' || kind == 'x') {
                rc = kind == 'n' ? WK_OK : WK_UNSURE;
            } else if (kind == 'a' && (rc = walk_scalars(w, slot->path, v, *p,
                                                         slot->flags & P_WANTED)) != WK_UNSURE) {
                /* done: scalars only */
            } else if (kind == 'm' || kind == 'a') {
                rc = walk_decoded(w, slot->path, v, *p);
            } else if (slot->flags & P_WANTED) {
                PyObject *o = mp_scalar(v, kind, vlen, hl);
                if (o == NULL) {
                    return WK_ERROR;
                }
                rc = add_one(w->flat, slot->path, o) < 0 ? WK_ERROR : WK_OK;
                Py_DECREF(o);
            }
        }
        if (rc != WK_OK) {
            return rc;
        }
    }
    return WK_OK;
}

/* What flatten_record(unpackb(whole[s:e])) holds at the wanted paths of t: a new dict,
 * Py_None (not decided here), or NULL with an exception set. */
static PyObject *flat_from(PathTable *t, PyObject *whole, const unsigned char *base,
                           Py_ssize_t s, Py_ssize_t e, PyObject *unpackb)
{
    Walk w; /* its path buffer: WALK_PATH bytes */
    w.t = t;
    w.whole = whole;
    w.base = base;
    w.unpackb = unpackb;
    w.flat = PyDict_New();
    if (w.flat == NULL) {
        return NULL;
    }
    const unsigned char *p = base + s;
    int rc = walk_map(&w, &p, base + e, 0, 0);
    PyObject *flat = w.flat;
    if (rc == WK_OK && p == base + e) {
        return flat;
    }
    Py_DECREF(flat);
    if (rc == WK_ERROR) {
        return NULL;
    }
    Py_RETURN_NONE; /* unsure, or bytes after the record (unpackb refuses those) */
}

/* flat_of(paths, data, unpackb): flat_from over the whole of data (tests). */
static PyObject *flat_of(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyObject_TypeCheck(args[0], &PathTableType)) {
        PyErr_SetString(PyExc_TypeError, "flat_of(paths: PathTable, data, unpackb)");
        return NULL;
    }
    PyObject *whole = PyMemoryView_FromObject(args[1]);
    if (whole == NULL) {
        return NULL;
    }
    Py_buffer *b = PyMemoryView_GET_BUFFER(whole);
    if (!PyBuffer_IsContiguous(b, 'C') || b->itemsize != 1) {
        Py_DECREF(whole);
        PyErr_SetString(PyExc_TypeError, "data must be contiguous bytes");
        return NULL;
    }
    PyObject *got = flat_from((PathTable *)args[0], whole, (const unsigned char *)b->buf, 0,
                              b->len, args[2]);
    Py_DECREF(whole);
    return got;
}

/* ------------------------------------------------------------------ Adder */

typedef struct {
    PyObject_HEAD
    PyObject *hits; /* a set */
    PyObject *only; /* a set or frozenset, or NULL */
} Adder;

static int Adder_init(Adder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"hits", "only", NULL};
    PyObject *hits, *only = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|O", kwlist, &PySet_Type, &hits, &only)) {
        return -1;
    }
    if (only != Py_None && !PyAnySet_Check(only)) {
        PyErr_SetString(PyExc_TypeError, "only must be a set, a frozenset or None");
        return -1;
    }
    Py_INCREF(hits);
    Py_XSETREF(self->hits, hits);
    if (only == Py_None) {
        Py_CLEAR(self->only);
    } else {
        Py_INCREF(only);
        Py_XSETREF(self->only, only);
    }
    return 0;
}

static PyObject *Adder_call(Adder *self, PyObject *args, PyObject *kwds)
{
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 1 || self->hits == NULL) {
        PyErr_SetString(PyExc_TypeError, "Adder(id, ...) expected");
        return NULL;
    }
    PyObject *id = PyTuple_GET_ITEM(args, 0);
    if (self->only != NULL) {
        int in = PySet_Contains(self->only, id);
        if (in < 0) {
            return NULL;
        }
        if (!in) {
            Py_RETURN_NONE;
        }
    }
    if (PySet_Add(self->hits, id) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int Adder_traverse(Adder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hits);
    Py_VISIT(self->only);
    return 0;
}

static int Adder_clear(Adder *self)
{
    Py_CLEAR(self->hits);
    Py_CLEAR(self->only);
    return 0;
}

static void Adder_dealloc(Adder *self)
{
    PyObject_GC_UnTrack(self);
    Adder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AdderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ruletag.rules._native.Adder",
    .tp_basicsize = sizeof(Adder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Adder(hits, only=None): a Hyperscan match handler adding each pattern id "
              "(its first argument) to the set hits, or only the ids in only.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Adder_init,
    .tp_call = (ternaryfunc)Adder_call,
    .tp_traverse = (traverseproc)Adder_traverse,
    .tp_clear = (inquiry)Adder_clear,
    .tp_dealloc = (destructor)Adder_dealloc,
};

/* ------------------------------------------------------------------ EntryHits */

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    Py_ssize_t *starts;
    Py_ssize_t *ends;
    Py_ssize_t last; /* index of the entry hit last, or -1 */
    PyObject *last_set; /* borrowed from per_entry */
    PyObject *per_entry; /* dict: entry index -> set of ids */
} EntryHits;

static int EntryHits_init(EntryHits *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"spans", NULL};
    PyObject *spans;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &spans)) {
        return -1;
    }
    PyObject *seq = PySequence_Fast(spans, "spans must be a sequence of (start, end) pairs");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t *starts = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    Py_ssize_t *ends = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    if (starts == NULL || ends == NULL) {
        PyMem_Free(starts);
        PyMem_Free(ends);
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t s = -1, e = -1;
        /* no PyArg_ParseTuple per pair: its format parsing cost more than the rest of the
           loop (a chunk holds a thousand entries) */
        int ok = PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2;
        if (ok) {
            s = PyNumber_AsSsize_t(PyTuple_GET_ITEM(pair, 0), PyExc_OverflowError);
            ok = !(s == -1 && PyErr_Occurred());
        }
        if (ok) {
            e = PyNumber_AsSsize_t(PyTuple_GET_ITEM(pair, 1), PyExc_OverflowError);
            ok = !(e == -1 && PyErr_Occurred());
        }
        if (!ok) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "spans must be (start, end) tuples");
            }
            PyMem_Free(starts);
            PyMem_Free(ends);
            Py_DECREF(seq);
            return -1;
        }
        if (i > 0 && s < starts[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "spans must be in ascending order");
            PyMem_Free(starts);
            PyMem_Free(ends);
            Py_DECREF(seq);
            return -1;
        }
        starts[i] = s;
        ends[i] = e;
    }
    Py_DECREF(seq);
    PyObject *per_entry = PyDict_New();
    if (per_entry == NULL) {
        PyMem_Free(starts);
        PyMem_Free(ends);
        return -1;
    }
    PyMem_Free(self->starts);
    PyMem_Free(self->ends);
    Py_XSETREF(self->per_entry, per_entry);
    self->starts = starts;
    self->ends = ends;
    self->n = n;
    self->last = -1;
    self->last_set = NULL;
    return 0;
}

static PyObject *EntryHits_call(EntryHits *self, PyObject *args, PyObject *kwds)
{
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 3 || self->per_entry == NULL) {
        PyErr_SetString(PyExc_TypeError, "EntryHits(id, from, to, ...) expected");
        return NULL;
    }
    PyObject *id = PyTuple_GET_ITEM(args, 0);
    Py_ssize_t to = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, 2));
    if (to == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t k = self->last;
    if (!(k >= 0 && self->starts[k] < to && to <= self->ends[k])) {
        /* bisect_right(starts, to - 1) - 1 */
        Py_ssize_t lo = 0, hi = self->n;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (to - 1 < self->starts[mid]) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        k = lo - 1;
        if (k < 0 || to > self->ends[k]) {
            Py_RETURN_NONE;
        }
        PyObject *key = PyLong_FromSsize_t(k);
        if (key == NULL) {
            return NULL;
        }
        PyObject *got = PyDict_GetItemWithError(self->per_entry, key); /* borrowed */
        if (got == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(key);
                return NULL;
            }
            got = PySet_New(NULL);
            if (got == NULL || PyDict_SetItem(self->per_entry, key, got) < 0) {
                Py_XDECREF(got);
                Py_DECREF(key);
                return NULL;
            }
            Py_DECREF(got); /* the dict holds it */
        }
        Py_DECREF(key);
        self->last = k;
        self->last_set = got;
    }
    if (PySet_Add(self->last_set, id) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *EntryHits_per_entry(EntryHits *self, void *closure)
{
    if (self->per_entry == NULL) {
        PyErr_SetString(PyExc_ValueError, "EntryHits not initialised");
        return NULL;
    }
    Py_INCREF(self->per_entry);
    return self->per_entry;
}

static int EntryHits_traverse(EntryHits *self, visitproc visit, void *arg)
{
    Py_VISIT(self->per_entry);
    return 0;
}

static int EntryHits_clear(EntryHits *self)
{
    self->last = -1;
    self->last_set = NULL;
    Py_CLEAR(self->per_entry);
    return 0;
}

static void EntryHits_dealloc(EntryHits *self)
{
    PyObject_GC_UnTrack(self);
    EntryHits_clear(self);
    PyMem_Free(self->starts);
    PyMem_Free(self->ends);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef EntryHits_getset[] = {
    {"per_entry", (getter)EntryHits_per_entry, NULL,
     "entry index -> the set of pattern ids that ended inside that entry", NULL},
    {NULL},
};

static PyTypeObject EntryHitsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ruletag.rules._native.EntryHits",
    .tp_basicsize = sizeof(EntryHits),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "EntryHits(spans): a Hyperscan match handler for a scan of a whole chunk; each "
              "match is filed under the entry (start, end] its end offset falls in.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EntryHits_init,
    .tp_call = (ternaryfunc)EntryHits_call,
    .tp_traverse = (traverseproc)EntryHits_traverse,
    .tp_clear = (inquiry)EntryHits_clear,
    .tp_dealloc = (destructor)EntryHits_dealloc,
    .tp_getset = EntryHits_getset,
};


/* ------------------------------------------------------------------ scan_cached */

/* algebra.as_text: a new reference to the text of a scalar, Py_None (new ref) for others. */
static PyObject *as_text(PyObject *v)
{
    if (PyUnicode_Check(v)) {
        Py_INCREF(v);
        return v;
    }
    if (PyBool_Check(v)) {
        return PyUnicode_FromString(v == Py_True ? "true" : "false");
    }
    if (PyLong_Check(v)) {
        return PyObject_Str(v);
    }
    if (PyFloat_Check(v)) {
        return PyObject_Repr(v);
    }
    if (PyBytes_Check(v)) {
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), "surrogateescape");
    }
    if (PyByteArray_Check(v)) {
        return PyUnicode_DecodeUTF8(PyByteArray_AS_STRING(v), PyByteArray_GET_SIZE(v),
                                    "surrogateescape");
    }
    Py_RETURN_NONE;
}

static int set_update_from(PyObject *hits, PyObject *items)
{
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PySet_Add(hits, PyTuple_GET_ITEM(items, i)) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The cache entry of a text: (key, hits, key, hits, ...), one pair per field group that
 * scanned it. The hits that group ``gkey`` found in ``s`` (borrowed), or NULL (not cached,
 * or an error set). */
static PyObject *cached_hits(PyObject *cache, PyObject *s, PyObject *gkey)
{
    PyObject *got = PyDict_GetItemWithError(cache, s); /* borrowed */
    if (got == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) % 2) {
        PyErr_SetString(PyExc_TypeError, "scan cache entries must be (key, hits, ...) tuples");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(got);
    for (Py_ssize_t j = 0; j < n; j += 2) {
        int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(got, j), gkey, Py_EQ);
        if (eq < 0) {
            return NULL;
        }
        if (eq) {
            PyObject *h = PyTuple_GET_ITEM(got, j + 1);
            if (!PyTuple_Check(h)) {
                PyErr_SetString(PyExc_TypeError, "scan cache hits must be tuples");
                return NULL;
            }
            return h;
        }
    }
    return NULL;
}

/* Scan s for group gkey (``miss`` into a fresh set), cache what it hits beside what other
 * groups found in s (the cache emptied first when it holds max_entries texts), and add it to
 * hits. 0, or -1 with an exception set. */
static int scan_miss(PyObject *cache, PyObject *s, PyObject *gkey, PyObject *hits,
                     PyObject *miss, Py_ssize_t max_entries)
{
    PyObject *mine = PySet_New(NULL);
    PyObject *r = mine == NULL ? NULL : PyObject_CallFunctionObjArgs(miss, s, mine, NULL);
    if (r == NULL) {
        Py_XDECREF(mine);
        return -1;
    }
    Py_DECREF(r);
    PyObject *tup = PySequence_Tuple(mine);
    Py_DECREF(mine);
    if (tup == NULL) {
        return -1;
    }
    /* looked up again: the scan ran Python code */
    PyObject *got = PyDict_GetItemWithError(cache, s); /* borrowed */
    PyObject *entry = NULL;
    if (got == NULL && !PyErr_Occurred()) {
        if (PyDict_GET_SIZE(cache) >= max_entries) {
            PyDict_Clear(cache);
        }
        entry = PyTuple_Pack(2, gkey, tup);
    } else if (got != NULL && PyTuple_Check(got)) {
        Py_ssize_t n = PyTuple_GET_SIZE(got);
        if ((entry = PyTuple_New(n + 2)) != NULL) {
            for (Py_ssize_t j = 0; j < n; j++) {
                PyObject *x = PyTuple_GET_ITEM(got, j);
                Py_INCREF(x);
                PyTuple_SET_ITEM(entry, j, x);
            }
            Py_INCREF(gkey);
            Py_INCREF(tup);
            PyTuple_SET_ITEM(entry, n, gkey);
            PyTuple_SET_ITEM(entry, n + 1, tup);
        }
    } else if (got != NULL) {
        PyErr_SetString(PyExc_TypeError, "scan cache entries must be (key, hits, ...) tuples");
    }
    int ok = entry == NULL ? -1 : PyDict_SetItem(cache, s, entry);
    Py_XDECREF(entry);
    if (ok == 0) {
        ok = set_update_from(hits, tup);
    }
    Py_DECREF(tup);
    return ok;
}

/* The loop of scan_cached over one sequence of values; 0, or -1 with an exception set. */
static int scan_values(PyObject *gkey, PyObject *values, PyObject *hits, PyObject *cache,
                       PyObject *miss, Py_ssize_t limit, Py_ssize_t max_entries)
{
    PyObject *seq = PySequence_Fast(values, "values must be a sequence");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = as_text(PySequence_Fast_GET_ITEM(seq, i));
        if (s == NULL) {
            goto done;
        }
        if (s == Py_None) {
            Py_DECREF(s);
            continue;
        }
        if (PyUnicode_GET_LENGTH(s) > limit) {
            PyObject *r = PyObject_CallFunctionObjArgs(miss, s, hits, NULL);
            Py_DECREF(s);
            if (r == NULL) {
                goto done;
            }
            Py_DECREF(r);
            continue;
        }
        PyObject *known = cached_hits(cache, s, gkey); /* borrowed */
        if (known == NULL && PyErr_Occurred()) {
            Py_DECREF(s);
            goto done;
        }
        int ok = known != NULL ? set_update_from(hits, known) : scan_miss(cache, s, gkey, hits,
                                                                          miss, max_entries);
        Py_DECREF(s);
        if (ok < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_DECREF(seq);
    return rc;
}

static int check_scan_args(PyObject *hits, PyObject *cache, PyObject *limit, PyObject *max,
                           Py_ssize_t *limit_out, Py_ssize_t *max_out)
{
    if (!PySet_Check(hits) || !PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "hits must be a set and cache a dict");
        return -1;
    }
    *limit_out = PyLong_AsSsize_t(limit);
    *max_out = PyLong_AsSsize_t(max);
    if ((*limit_out == -1 || *max_out == -1) && PyErr_Occurred()) {
        return -1;
    }
    return 0;
}

static PyObject *view_values(PyObject *view, PyObject *field);

static PyObject *scan_cached(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_cached(key, values, hits, cache, miss, limit, max_entries)");
        return NULL;
    }
    Py_ssize_t limit, max_entries;
    if (check_scan_args(args[2], args[3], args[5], args[6], &limit, &max_entries) < 0 ||
        scan_values(args[0], args[1], args[2], args[3], args[4], limit, max_entries) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ scan_groups */

/* The values of one group's field: vcache's, else its dotted paths' in flat (cached), else
 * (unless direct: the field has only those paths, so none of them means no value; the
 * reference skips such a group when flat holds none of its paths) view.values(field).
 * A new reference, or NULL with an exception set. */
static PyObject *group_values(PyObject *field, PyObject *dotted, PyObject *view, PyObject *flat,
                              PyObject *vcache, int direct)
{
    PyObject *got = PyDict_GetItemWithError(vcache, field); /* borrowed */
    if (got != NULL) {
        Py_INCREF(got);
        return got;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (!PyTuple_Check(dotted)) {
        PyErr_SetString(PyExc_TypeError, "a group's dotted paths must be a tuple");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(dotted);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *vals = PyDict_GetItemWithError(flat, PyTuple_GET_ITEM(dotted, i));
        if (vals == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            continue;
        }
        if (PyList_SetSlice(out, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, vals) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    if (PyList_GET_SIZE(out) > 0) {
        if (PyDict_SetItem(vcache, field, out) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        return out;
    }
    if (direct) {
        return out; /* empty */
    }
    Py_DECREF(out);
    return view_values(view, field);
}

/* scan_groups with its arguments checked (hits a set, cache a dict); 0, or -1 with an
 * exception set. */
static int scan_groups_in(PyObject *todo, PyObject *spec, PyObject *view, PyObject *flat,
                          PyObject *vcache, PyObject *hits, PyObject *cache, Py_ssize_t limit,
                          Py_ssize_t max_entries)
{
    if (!PyTuple_Check(spec) || !PyDict_Check(flat) || !PyDict_Check(vcache)) {
        PyErr_SetString(PyExc_TypeError, "spec must be a tuple, flat and vcache dicts");
        return -1;
    }
    PyObject *it = PyObject_GetIter(todo);
    if (it == NULL) {
        return -1;
    }
    PyObject *gi;
    while ((gi = PyIter_Next(it)) != NULL) {
        Py_ssize_t k = PyLong_AsSsize_t(gi);
        Py_DECREF(gi);
        if (k == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (k < 0 || k >= PyTuple_GET_SIZE(spec)) {
            PyErr_SetString(PyExc_IndexError, "field group index out of range");
            goto fail;
        }
        PyObject *entry = PyTuple_GET_ITEM(spec, k);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 5) {
            PyErr_SetString(PyExc_TypeError, "spec entries: (paths, field, dotted, key, miss)");
            goto fail;
        }
        /* direct paths (not None) are the dotted paths as a set: group_values reads them */
        int direct = PyTuple_GET_ITEM(entry, 0) != Py_None;
        PyObject *vals = group_values(PyTuple_GET_ITEM(entry, 1), PyTuple_GET_ITEM(entry, 2),
                                      view, flat, vcache, direct);
        if (vals == NULL) {
            goto fail;
        }
        int truth = PyObject_IsTrue(vals);
        int rc = truth < 0 ? -1
                 : truth   ? scan_values(PyTuple_GET_ITEM(entry, 3), vals, hits, cache,
                                         PyTuple_GET_ITEM(entry, 4), limit, max_entries)
                           : 0;
        Py_DECREF(vals);
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
fail:
    Py_DECREF(it);
    return -1;
}

static PyObject *scan_groups(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "scan_groups(todo, spec, view, flat, vcache, hits, "
                                         "cache, limit, max_entries)");
        return NULL;
    }
    Py_ssize_t limit, max_entries;
    if (check_scan_args(args[5], args[6], args[7], args[8], &limit, &max_entries) < 0 ||
        scan_groups_in(args[0], args[1], args[2], args[3], args[4], args[5], args[6], limit,
                       max_entries) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ ViewBase */

/* Derivation kinds of a field plan's ``spec`` (see fields._Plan). */
enum { D_BASENAME = 0, D_COPY = 1, D_WHEN_PRESENT = 2, D_WINDOWS_EVENT = 3 };

typedef struct {
    PyObject_HEAD
    PyObject *map;     /* the FieldMap */
    PyObject *record;  /* the record as given */
    PyObject *cache;   /* field -> its values (a dict) */
    PyObject *flat;    /* flatten_record(record), once computed, or NULL */
    PyObject *strings; /* (fields.RecordView.strings) or NULL */
    PyObject *event;   /* (fields.RecordView._windows_event) */
    PyObject *plans;   /* map._plans: field -> plan */
    /* Made by match_loop from the record's bytes (else NULL / 0): */
    PyObject *raw;     /* the record's bytes (a memoryview), decoded when first needed */
    PyObject *unpackb; /* what decodes them */
    PyObject *paths;   /* while partial: the PathTable flat was read with */
    int partial;       /* flat holds only the paths paths->covered (flat_from) */
} View;

static PyObject *View_values(View *self, PyObject *field);
static PyTypeObject ViewType;

static int View_init(View *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fieldmap", "record", NULL};
    PyObject *fmap, *record;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &fmap, &record)) {
        return -1;
    }
    PyObject *plans = PyObject_GetAttr(fmap, s_plans);
    if (plans == NULL) {
        return -1;
    }
    if (!PyDict_Check(plans)) {
        Py_DECREF(plans);
        PyErr_SetString(PyExc_TypeError, "fieldmap._plans must be a dict");
        return -1;
    }
    PyObject *cache = PyDict_New();
    if (cache == NULL) {
        Py_DECREF(plans);
        return -1;
    }
    Py_INCREF(fmap);
    Py_INCREF(record);
    Py_INCREF(Py_False);
    Py_XSETREF(self->map, fmap);
    Py_XSETREF(self->record, record);
    Py_XSETREF(self->cache, cache);
    Py_XSETREF(self->plans, plans);
    Py_XSETREF(self->event, Py_False);
    Py_CLEAR(self->flat);
    Py_CLEAR(self->strings);
    Py_CLEAR(self->raw);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->paths);
    self->partial = 0;
    return 0;
}

/* The record (decoded from self->raw the first time when the view was made from its bytes).
 * Borrowed; NULL with an exception set. */
static PyObject *view_record(View *self)
{
    if (self->record != NULL) {
        return self->record;
    }
    if (self->raw == NULL || self->unpackb == NULL) {
        PyErr_SetString(PyExc_TypeError, "the record view is not initialised");
        return NULL;
    }
    PyObject *args[4] = {self->raw, Py_False, s_surrogateescape, Py_False};
    PyObject *rec = PyObject_Vectorcall(self->unpackb, args, 1, unpack_kwnames);
    if (rec != NULL && !PyDict_Check(rec)) { /* flat_from saw a map: cannot happen */
        Py_DECREF(rec);
        PyErr_SetString(PyExc_ValueError, "the record's bytes no longer decode to a map");
        return NULL;
    }
    self->record = rec;
    return rec;
}

/* self->flat made whole (flatten_record of the record) unless it is already. 0 or -1. */
static int view_full_flat(View *self)
{
    if (self->flat != NULL && self->flat != Py_None && !self->partial) {
        return 0;
    }
    PyObject *rec = view_record(self);
    PyObject *f = rec == NULL ? NULL : flatten_record(NULL, rec);
    if (f == NULL) {
        return -1;
    }
    Py_XSETREF(self->flat, f);
    self->partial = 0;
    Py_CLEAR(self->paths);
    return 0;
}

/* The last component of a Windows or POSIX path (fields.basename). New reference. */
static PyObject *path_basename(PyObject *v)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    Py_ssize_t a = PyUnicode_FindChar(v, '\\', 0, n, -1);
    Py_ssize_t b = PyUnicode_FindChar(v, '/', 0, n, -1);
    if (a == -2 || b == -2) {
        return NULL;
    }
    return PyUnicode_Substring(v, (a > b ? a : b) + 1, n);
}

/* Whether view.values(field) is non-empty: 1, 0, or -1 with an exception set. */
static int has_values(View *self, PyObject *field)
{
    PyObject *got = View_values(self, field);
    if (got == NULL) {
        return -1;
    }
    int yes = PyObject_IsTrue(got);
    Py_DECREF(got);
    return yes;
}

/* The record's known Windows event row (fields._ViewMethods._event_row), looked up once and
 * kept in self->event (the row or None). ``d`` is the derivation (3, attr, channel field,
 * event id field, events table, event id parser). Borrowed reference; NULL on error. */
static PyObject *event_row(View *self, PyObject *d)
{
    if (self->event != Py_False) {
        return self->event;
    }
    PyObject *events = PyTuple_GET_ITEM(d, 4);
    PyObject *as_int = PyTuple_GET_ITEM(d, 5);
    if (!PyDict_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "windows event: the events table must be a dict");
        return NULL;
    }
    PyObject *chans = View_values(self, PyTuple_GET_ITEM(d, 2));
    if (chans == NULL) {
        return NULL;
    }
    PyObject *ids = NULL;
    PyObject *row = Py_None; /* borrowed from events */
    if (!PyList_Check(chans)) {
        PyErr_SetString(PyExc_TypeError, "values must be a list");
        goto fail;
    }
    for (Py_ssize_t i = 0; row == Py_None && i < PyList_GET_SIZE(chans); i++) {
        PyObject *ch = PyList_GET_ITEM(chans, i);
        if (!PyUnicode_Check(ch)) {
            continue;
        }
        if (ids == NULL) {
            ids = View_values(self, PyTuple_GET_ITEM(d, 3));
            if (ids == NULL) {
                goto fail;
            }
            if (!PyList_Check(ids)) {
                PyErr_SetString(PyExc_TypeError, "values must be a list");
                goto fail;
            }
        }
        if (PyList_GET_SIZE(ids) == 0) {
            break;
        }
        PyObject *lower = PyObject_CallMethodNoArgs(ch, s_lower);
        if (lower == NULL) {
            goto fail;
        }
        for (Py_ssize_t j = 0; row == Py_None && j < PyList_GET_SIZE(ids); j++) {
            PyObject *eid = PyList_GET_ITEM(ids, j);
            PyObject *num;
            if (PyLong_CheckExact(eid)) {
                Py_INCREF(eid);
                num = eid;
            } else {
                num = PyObject_CallOneArg(as_int, eid);
                if (num == NULL) {
                    Py_DECREF(lower);
                    goto fail;
                }
            }
            if (num != Py_None) {
                PyObject *key = PyTuple_Pack(2, lower, num);
                PyObject *got = key == NULL ? NULL : PyDict_GetItemWithError(events, key);
                Py_XDECREF(key);
                if (got == NULL && PyErr_Occurred()) {
                    Py_DECREF(num);
                    Py_DECREF(lower);
                    goto fail;
                }
                if (got != NULL) {
                    row = got;
                }
            }
            Py_DECREF(num);
        }
        Py_DECREF(lower);
    }
    Py_INCREF(row);
    Py_SETREF(self->event, row);
    Py_DECREF(chans);
    Py_XDECREF(ids);
    return row;
fail:
    Py_DECREF(chans);
    Py_XDECREF(ids);
    return NULL;
}

/* A Windows event derivation (fields._ViewMethods._windows_event). New reference (a list). */
static PyObject *windows_event(View *self, PyObject *d)
{
    if (PyTuple_GET_SIZE(d) != 6 || !PyUnicode_Check(PyTuple_GET_ITEM(d, 1))) {
        PyErr_SetString(PyExc_TypeError,
                        "windows event: (3, attr, channel, event_id, events, as_int)");
        return NULL;
    }
    PyObject *row = event_row(self, d);
    if (row == NULL) {
        return NULL;
    }
    if (row == Py_None) {
        return PyList_New(0);
    }
    int cat = PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(d, 1), "category") == 0;
    PyObject *vals = PyObject_GetAttr(row, cat ? s_ecs_category : s_ecs_type);
    if (vals == NULL) {
        return NULL;
    }
    PyObject *out = PySequence_List(vals);
    Py_DECREF(vals);
    return out;
}

/* One derivation ``d`` (a tuple: kind, then its arguments). New reference (a list). */
static PyObject *derive(View *self, PyObject *d)
{
    if (!PyTuple_Check(d) || PyTuple_GET_SIZE(d) < 2) {
        PyErr_SetString(PyExc_TypeError, "a derivation must be a tuple (kind, ...)");
        return NULL;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(d, 0));
    if (kind == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *arg = PyTuple_GET_ITEM(d, 1);
    if (kind == D_WINDOWS_EVENT) {
        return windows_event(self, d);
    }
    if (kind == D_WHEN_PRESENT) {
        if (PyTuple_GET_SIZE(d) != 4 || !PyTuple_Check(PyTuple_GET_ITEM(d, 3))) {
            PyErr_SetString(PyExc_TypeError, "when-present: (2, source, value, unless)");
            return NULL;
        }
        int present = has_values(self, arg);
        PyObject *unless = PyTuple_GET_ITEM(d, 3);
        for (Py_ssize_t i = 0; present == 1 && i < PyTuple_GET_SIZE(unless); i++) {
            int other = has_values(self, PyTuple_GET_ITEM(unless, i));
            present = other < 0 ? -1 : !other;
        }
        if (present < 0) {
            return NULL;
        }
        PyObject *out = PyList_New(present ? 1 : 0);
        if (out != NULL && present) {
            PyObject *value = PyTuple_GET_ITEM(d, 2);
            Py_INCREF(value);
            PyList_SET_ITEM(out, 0, value);
        }
        return out;
    }
    if (kind != D_BASENAME && kind != D_COPY) {
        PyErr_Format(PyExc_ValueError, "unknown derivation kind %ld", kind);
        return NULL;
    }
    PyObject *only = Py_None;
    int caseless = 0;
    if (kind == D_COPY) {
        if (PyTuple_GET_SIZE(d) != 4) {
            PyErr_SetString(PyExc_TypeError, "copy: (1, source, only, caseless)");
            return NULL;
        }
        only = PyTuple_GET_ITEM(d, 2);
        caseless = PyObject_IsTrue(PyTuple_GET_ITEM(d, 3));
        if (caseless < 0) {
            return NULL;
        }
    }
    PyObject *src = View_values(self, arg);
    if (src == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL || !PyList_Check(src)) {
        if (out != NULL) {
            PyErr_SetString(PyExc_TypeError, "values must be a list");
        }
        Py_XDECREF(out);
        Py_DECREF(src);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(src); i++) {
        PyObject *v = PyList_GET_ITEM(src, i);
        PyObject *item = NULL;
        if (kind == D_BASENAME) {
            if (!PyUnicode_Check(v)) {
                continue;
            }
            item = path_basename(v);
        } else if (only == Py_None) {
            Py_INCREF(v);
            item = v;
        } else {
            if (!PyUnicode_Check(v)) {
                continue;
            }
            PyObject *key = caseless ? PyObject_CallMethodNoArgs(v, s_lower) : (Py_INCREF(v), v);
            if (key == NULL) {
                goto fail;
            }
            int in = PySequence_Contains(only, key);
            Py_DECREF(key);
            if (in < 0) {
                goto fail;
            }
            if (!in) {
                continue;
            }
            Py_INCREF(v);
            item = v;
        }
        if (item == NULL) {
            goto fail;
        }
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(src);
    return out;
fail:
    Py_DECREF(src);
    Py_DECREF(out);
    return NULL;
}

/* The record's values for ``field`` (fields.PyRecordView._compute). New reference. */
static PyObject *compute(View *self, PyObject *field)
{
    PyObject *dotted = NULL, *spec = NULL, *out = NULL;
    int checked = 0; /* the dotted paths are known to be covered */
    if (self->partial) { /* the plans the path table was made with: no coverage check */
        PyObject *pre = PyDict_GetItemWithError(((PathTable *)self->paths)->plans, field);
        if (pre == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (pre != NULL) { /* (dotted, spec), checked by PathTable_init */
            dotted = PyTuple_GET_ITEM(pre, 0);
            spec = PyTuple_GET_ITEM(pre, 1);
            Py_INCREF(dotted);
            Py_INCREF(spec);
            checked = 1;
        }
    }
    if (dotted == NULL) {
        PyObject *plan = PyDict_GetItemWithError(self->plans, field); /* borrowed */
        if (plan != NULL) {
            Py_INCREF(plan);
        } else if (PyErr_Occurred()) {
            return NULL;
        } else {
            plan = PyObject_CallMethodOneArg(self->map, s_plan, field);
            if (plan == NULL) {
                return NULL;
            }
        }
        dotted = PyObject_GetAttr(plan, s_dotted);
        spec = dotted == NULL ? NULL : PyObject_GetAttr(plan, s_spec);
        Py_DECREF(plan);
        if (spec == NULL) {
            goto done;
        }
    }
    if (!PyTuple_Check(dotted) || !PyTuple_Check(spec)) {
        PyErr_SetString(PyExc_TypeError, "a plan's dotted paths and spec must be tuples");
        goto done;
    }
    if (self->flat == NULL || self->flat == Py_None) {
        if (view_full_flat(self) < 0) {
            goto done;
        }
    }
    for (Py_ssize_t i = 0; !checked && self->partial && i < PyTuple_GET_SIZE(dotted); i++) {
        int in = PySet_Contains(((PathTable *)self->paths)->covered, PyTuple_GET_ITEM(dotted, i));
        if (in < 0 || (in == 0 && view_full_flat(self) < 0)) {
            goto done;
        }
    }
    out = PyList_New(0);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dotted); i++) {
        PyObject *vals = PyDict_GetItemWithError(self->flat, PyTuple_GET_ITEM(dotted, i));
        if (vals == NULL) {
            if (PyErr_Occurred()) {
                Py_CLEAR(out);
                goto done;
            }
            continue;
        }
        if (PyList_SetSlice(out, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, vals) < 0) {
            Py_CLEAR(out);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; PyList_GET_SIZE(out) == 0 && i < PyTuple_GET_SIZE(spec); i++) {
        Py_SETREF(out, derive(self, PyTuple_GET_ITEM(spec, i)));
        if (out == NULL) {
            goto done;
        }
        if (!PyList_Check(out)) {
            PyErr_SetString(PyExc_TypeError, "a derivation must give a list");
            Py_CLEAR(out);
            goto done;
        }
    }
done:
    Py_XDECREF(dotted);
    Py_XDECREF(spec);
    return out;
}

static PyObject *View_values(View *self, PyObject *field)
{
    if (self->cache == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "view not initialised");
        return NULL;
    }
    PyObject *got = PyDict_GetItemWithError(self->cache, field); /* borrowed */
    if (got != NULL) {
        Py_INCREF(got);
        return got;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (Py_EnterRecursiveCall(" in RecordView.values")) {
        return NULL;
    }
    got = compute(self, field);
    Py_LeaveRecursiveCall();
    if (got != NULL && PyDict_SetItem(self->cache, field, got) < 0) {
        Py_CLEAR(got);
    }
    return got;
}

/* view.values(field): in C for a ViewBase (fields.RecordView), else the method. */
static PyObject *view_values(PyObject *view, PyObject *field)
{
    if (PyObject_TypeCheck(view, &ViewType)) {
        return View_values((View *)view, field);
    }
    return PyObject_CallMethodOneArg(view, s_values, field);
}

static int View_traverse(View *self, visitproc visit, void *arg)
{
    Py_VISIT(self->map);
    Py_VISIT(self->record);
    Py_VISIT(self->cache);
    Py_VISIT(self->flat);
    Py_VISIT(self->strings);
    Py_VISIT(self->event);
    Py_VISIT(self->plans);
    Py_VISIT(self->raw);
    Py_VISIT(self->unpackb);
    Py_VISIT(self->paths);
    return 0;
}

static int View_clear(View *self)
{
    Py_CLEAR(self->map);
    Py_CLEAR(self->record);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->flat);
    Py_CLEAR(self->strings);
    Py_CLEAR(self->event);
    Py_CLEAR(self->plans);
    Py_CLEAR(self->raw);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->paths);
    return 0;
}

static void View_dealloc(View *self)
{
    PyObject_GC_UnTrack(self);
    View_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef View_methods[] = {
    {"values", (PyCFunction)View_values, METH_O,
     "values(field) -> every value the record has for field (see fields.PyRecordView)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef View_members[] = {
    {"_map", T_OBJECT, offsetof(View, map), READONLY, NULL},
    {"_cache", T_OBJECT, offsetof(View, cache), READONLY, NULL},
    {"_strings", T_OBJECT, offsetof(View, strings), 0, NULL},
    {"_event", T_OBJECT, offsetof(View, event), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *View_get_record(View *self, void *closure)
{
    PyObject *rec = view_record(self);
    Py_XINCREF(rec);
    return rec;
}

/* _flat: None until computed; a view made from the record's bytes holds only the paths the
 * table reads, and is made whole here, for Python code (fields._ViewMethods.flat). */
static PyObject *View_get_flat(View *self, void *closure)
{
    if (self->partial && view_full_flat(self) < 0) {
        return NULL;
    }
    PyObject *f = self->flat != NULL ? self->flat : Py_None;
    Py_INCREF(f);
    return f;
}

static int View_set_flat(View *self, PyObject *value, void *closure)
{
    Py_XINCREF(value);
    Py_XSETREF(self->flat, value);
    self->partial = 0;
    Py_CLEAR(self->paths);
    return 0;
}

static PyGetSetDef View_getset[] = {
    {"_record", (getter)View_get_record, NULL, "the record (decoded when first asked for)", NULL},
    {"_flat", (getter)View_get_flat, (setter)View_set_flat, "flatten_record(record) or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ruletag.rules._native.ViewBase",
    .tp_basicsize = sizeof(View),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ViewBase(fieldmap, record): a record seen through the field map (values in C).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)View_init,
    .tp_traverse = (traverseproc)View_traverse,
    .tp_clear = (inquiry)View_clear,
    .tp_dealloc = (destructor)View_dealloc,
    .tp_methods = View_methods,
    .tp_members = View_members,
    .tp_getset = View_getset,
};

/* ------------------------------------------------------------------ LazyLeaf */

/* The kinds of lazy leaves evaluated in C (matcher.leaves.lazy_fn builds them). */
enum { L_EXISTS, L_ISNULL, L_EQUALS, L_EQUALS_BOOL, L_COMPARE, L_FIELDREF, L_CIDR };
/* FieldRef operators */
enum { R_EQ, R_STARTSWITH, R_ENDSWITH, R_CONTAINS };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    int op;             /* L_COMPARE: Py_LT, Py_LE, Py_GT or Py_GE; L_FIELDREF: R_* */
    int cased;          /* L_FIELDREF: texts compared as they are (else lower-cased) */
    PyObject *field;    /* the field whose values are tested */
    PyObject *want;     /* L_EQUALS*: the value; L_COMPARE: the number; L_FIELDREF: the
                         * other field */
    PyObject *fallback; /* L_EQUALS*: algebra.equals_value; L_COMPARE: algebra.number_of;
                         * L_FIELDREF: the Python leaf function (view, cache) -> bool, for
                         * anything but one text on each side; L_CIDR: leaves._ip_int */
    /* L_CIDR: want is (starts, ends), the merged address ranges (IPv6 ones above 2**32);
     * their IPv4 part, for dotted-quad texts read here: */
    uint32_t *v4_starts, *v4_ends;
    Py_ssize_t n_v4;
} LazyLeaf;

/* The IPv4 address a text spells exactly as ipaddress.ip_address takes it (four decimal
 * octets of at most three ASCII digits, no leading zero, each at most 255, nothing around):
 * 1 with *ip set, else 0 (the text is then left to leaves._ip_int). */
static int dotted_quad(PyObject *v, uint32_t *ip)
{
    if (!PyUnicode_IS_ASCII(v)) {
        return 0;
    }
    const char *p = (const char *)PyUnicode_DATA(v);
    Py_ssize_t n = PyUnicode_GET_LENGTH(v), i = 0;
    uint32_t out = 0;
    for (int octet = 0; octet < 4; octet++) {
        if (octet > 0) {
            if (i >= n || p[i] != '.') {
                return 0;
            }
            i++;
        }
        Py_ssize_t start = i;
        unsigned x = 0;
        while (i < n && p[i] >= '0' && p[i] <= '9' && i - start < 3) {
            x = x * 10 + (unsigned)(p[i] - '0');
            i++;
        }
        if (i == start || x > 255 || (i - start > 1 && p[start] == '0') ||
            (i < n && p[i] >= '0' && p[i] <= '9')) {
            return 0;
        }
        out = (out << 8) | x;
    }
    if (i != n) {
        return 0;
    }
    *ip = out;
    return 1;
}

/* Whether the address number ``ip`` (leaves._ip_int) is in one of the ranges (starts, ends):
 * the last range starting at or below it ends at or above it. 1, 0 or -1. */
static int in_ranges(PyObject *starts, PyObject *ends, PyObject *ip)
{
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(starts);
    while (lo < hi) { /* bisect_right */
        Py_ssize_t mid = (lo + hi) / 2;
        int lt = PyObject_RichCompareBool(ip, PyTuple_GET_ITEM(starts, mid), Py_LT);
        if (lt < 0) {
            return -1;
        }
        if (lt) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if (lo == 0) {
        return 0;
    }
    return PyObject_RichCompareBool(ip, PyTuple_GET_ITEM(ends, lo - 1), Py_LE);
}

/* One value against a Cidr leaf: a dotted-quad text against the IPv4 ranges here, anything
 * else through leaves._ip_int and the whole ranges. 1, 0 or -1. */
static int leaf_cidr(LazyLeaf *self, PyObject *v)
{
    uint32_t ip;
    if (PyUnicode_CheckExact(v) && dotted_quad(v, &ip)) {
        Py_ssize_t lo = 0, hi = self->n_v4;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (ip < self->v4_starts[mid]) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        return lo > 0 && ip <= self->v4_ends[lo - 1];
    }
    PyObject *num = PyObject_CallOneArg(self->fallback, v);
    if (num == NULL) {
        return -1;
    }
    int r = num == Py_None ? 0
                           : in_ranges(PyTuple_GET_ITEM(self->want, 0),
                                       PyTuple_GET_ITEM(self->want, 1), num);
    Py_DECREF(num);
    return r;
}

/* One value against an Equals (numbers) leaf: an int or a float is compared as is (what
 * number_of gives for them), anything else through equals_value. 1, 0 or -1. */
static int leaf_equals(LazyLeaf *self, PyObject *v)
{
    if (PyLong_CheckExact(v) || PyFloat_CheckExact(v)) {
        return PyObject_RichCompareBool(v, self->want, Py_EQ);
    }
    PyObject *args[2] = {v, self->want};
    PyObject *r = PyObject_Vectorcall(self->fallback, args, 2, NULL);
    if (r == NULL) {
        return -1;
    }
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* One value against an Equals (bool) leaf: a bool is the same bool, anything else's text is
 * "true" / "false" (algebra.equals_value). */
static int leaf_equals_bool(LazyLeaf *self, PyObject *v)
{
    if (PyBool_Check(v)) {
        return v == self->want;
    }
    PyObject *text = as_text(v);
    if (text == NULL) {
        return -1;
    }
    int r = 0;
    if (text != Py_None) {
        r = PyUnicode_CompareWithASCIIString(text, self->want == Py_True ? "true" : "false") == 0;
    }
    Py_DECREF(text);
    return r;
}

/* One value against a Compare leaf: its number (number_of: an int or float as is, a bool
 * none) compared with the leaf's. */
static int leaf_compare(LazyLeaf *self, PyObject *v)
{
    if (PyLong_CheckExact(v) || PyFloat_CheckExact(v)) {
        return PyObject_RichCompareBool(v, self->want, self->op);
    }
    if (PyBool_Check(v)) {
        return 0;
    }
    PyObject *x = PyObject_CallOneArg(self->fallback, v);
    if (x == NULL) {
        return -1;
    }
    int r = x == Py_None ? 0 : PyObject_RichCompareBool(x, self->want, self->op);
    Py_DECREF(x);
    return r;
}

/* A FieldRef leaf once this field has values (vals): no value on the other side is false;
 * one text on each side is compared here (matcher.leaves._fieldref); anything else is the
 * Python leaf function's. */
static int leaf_fieldref(LazyLeaf *self, PyObject *vals, PyObject *const *args)
{
    PyObject *other = view_values(args[0], self->want);
    if (other == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(other);
    if (r > 0) {
        if (PyList_CheckExact(vals) && PyList_CheckExact(other) && PyList_GET_SIZE(vals) == 1 &&
            PyList_GET_SIZE(other) == 1 && PyUnicode_CheckExact(PyList_GET_ITEM(vals, 0)) &&
            PyUnicode_CheckExact(PyList_GET_ITEM(other, 0))) {
            PyObject *x = PyList_GET_ITEM(vals, 0), *y = PyList_GET_ITEM(other, 0);
            if (self->cased) {
                Py_INCREF(x);
                Py_INCREF(y);
            } else {
                x = PyObject_CallMethodNoArgs(x, s_lower);
                y = x == NULL ? NULL : PyObject_CallMethodNoArgs(y, s_lower);
            }
            if (y == NULL) {
                r = -1;
            } else if (self->op == R_EQ) {
                r = PyObject_RichCompareBool(x, y, Py_EQ);
            } else if (self->op == R_CONTAINS) {
                r = PyUnicode_Contains(x, y);
            } else {
                Py_ssize_t m = PyUnicode_Tailmatch(x, y, 0, PY_SSIZE_T_MAX,
                                                   self->op == R_STARTSWITH ? -1 : 1);
                r = m < 0 ? -1 : (int)m;
            }
            Py_XDECREF(x);
            Py_XDECREF(y);
        } else {
            PyObject *got = PyObject_Vectorcall(self->fallback, args, 2, NULL);
            r = got == NULL ? -1 : PyObject_IsTrue(got);
            Py_XDECREF(got);
        }
    }
    Py_DECREF(other);
    return r;
}

static PyObject *LazyLeaf_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames)
{
    LazyLeaf *self = (LazyLeaf *)callable;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a lazy leaf takes (view, cache)");
        return NULL;
    }
    if (self->field == NULL) {
        PyErr_SetString(PyExc_TypeError, "the lazy leaf is not initialised");
        return NULL;
    }
    PyObject *vals = view_values(args[0], self->field);
    if (vals == NULL) {
        return NULL;
    }
    int r = 0;
    if (self->kind == L_EXISTS || self->kind == L_ISNULL || self->kind == L_FIELDREF) {
        r = PyObject_IsTrue(vals);
        if (r >= 0 && self->kind == L_ISNULL) {
            r = !r;
        } else if (r > 0 && self->kind == L_FIELDREF) {
            r = leaf_fieldref(self, vals, args);
        }
    } else {
        PyObject *seq = PySequence_Fast(vals, "a field's values must be a sequence");
        if (seq == NULL) {
            r = -1;
        } else {
            Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
            for (Py_ssize_t i = 0; i < n && r == 0; i++) {
                PyObject *v = PySequence_Fast_GET_ITEM(seq, i);
                r = self->kind == L_EQUALS        ? leaf_equals(self, v)
                    : self->kind == L_EQUALS_BOOL ? leaf_equals_bool(self, v)
                    : self->kind == L_CIDR        ? leaf_cidr(self, v)
                                                  : leaf_compare(self, v);
            }
            Py_DECREF(seq);
        }
    }
    Py_DECREF(vals);
    if (r < 0) {
        return NULL;
    }
    return PyBool_FromLong(r);
}

/* A Cidr leaf's ranges ``want`` checked ((starts, ends): two tuples of as many ints, starts
 * ascending, each range's end at or above its start) and their IPv4 part kept in C. 0, or
 * -1 (no exception set: the caller reports a bad leaf). */
static int cidr_ranges(LazyLeaf *self, PyObject *want)
{
    if (!PyTuple_Check(want) || PyTuple_GET_SIZE(want) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(want, 0)) || !PyTuple_Check(PyTuple_GET_ITEM(want, 1))) {
        return -1;
    }
    PyObject *starts = PyTuple_GET_ITEM(want, 0), *ends = PyTuple_GET_ITEM(want, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(starts);
    if (PyTuple_GET_SIZE(ends) != n) {
        return -1;
    }
    uint32_t *s4 = PyMem_Calloc((size_t)n + 1, sizeof(uint32_t));
    uint32_t *e4 = PyMem_Calloc((size_t)n + 1, sizeof(uint32_t));
    Py_ssize_t k = 0;
    int bad = s4 == NULL || e4 == NULL;
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        PyObject *a = PyTuple_GET_ITEM(starts, i), *b = PyTuple_GET_ITEM(ends, i);
        if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b)) {
            bad = 1;
            break;
        }
        int oa = 0, ob = 0; /* past a long long (IPv6 numbers): 1 */
        long long x = PyLong_AsLongLongAndOverflow(a, &oa);
        long long y = PyLong_AsLongLongAndOverflow(b, &ob);
        if (PyErr_Occurred() || oa < 0 || ob < 0 || (!oa && x < 0) || (!ob && y < 0) ||
            (!oa && !ob && y < x) || (oa && !ob)) {
            bad = 1;
        } else if (!oa && x <= 0xFFFFFFFFLL) { /* an IPv4 part, its end cut at 2**32 - 1 */
            s4[k] = (uint32_t)x;
            e4[k++] = ob || y > 0xFFFFFFFFLL ? 0xFFFFFFFFu : (uint32_t)y;
        }
    }
    if (bad) {
        PyErr_Clear();
        PyMem_Free(s4);
        PyMem_Free(e4);
        return -1;
    }
    PyMem_Free(self->v4_starts);
    PyMem_Free(self->v4_ends);
    self->v4_starts = s4;
    self->v4_ends = e4;
    self->n_v4 = k;
    return 0;
}

static int LazyLeaf_init(LazyLeaf *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "field", "want", "op", "fallback", "cased", NULL};
    int kind, cased = 0;
    PyObject *field, *want = Py_None, *fallback = Py_None;
    const char *op = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iU|OzOp", kwlist, &kind, &field, &want, &op,
                                     &fallback, &cased)) {
        return -1;
    }
    int cmp = -1;
    if (op != NULL && kind == L_COMPARE) {
        cmp = !strcmp(op, "<")    ? Py_LT
              : !strcmp(op, "<=") ? Py_LE
              : !strcmp(op, ">")  ? Py_GT
              : !strcmp(op, ">=") ? Py_GE
                                  : -1;
    } else if (op != NULL && kind == L_FIELDREF) {
        cmp = !strcmp(op, "eq")           ? R_EQ
              : !strcmp(op, "startswith") ? R_STARTSWITH
              : !strcmp(op, "endswith")   ? R_ENDSWITH
              : !strcmp(op, "contains")   ? R_CONTAINS
                                          : -1;
    }
    int ok = kind == L_EXISTS || kind == L_ISNULL ||
             (kind == L_EQUALS && PyCallable_Check(fallback) && !PyBool_Check(want)) ||
             (kind == L_EQUALS_BOOL && PyBool_Check(want)) ||
             (kind == L_COMPARE && cmp >= 0 && PyCallable_Check(fallback)) ||
             (kind == L_FIELDREF && cmp >= 0 && PyUnicode_Check(want) &&
              PyCallable_Check(fallback)) ||
             (kind == L_CIDR && PyCallable_Check(fallback) && cidr_ranges(self, want) == 0);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "LazyLeaf: a known kind with its value, operator "
                                          "and fallback");
        return -1;
    }
    self->kind = kind;
    self->op = cmp;
    self->cased = cased;
    Py_INCREF(field);
    Py_INCREF(want);
    Py_INCREF(fallback);
    Py_XSETREF(self->field, field);
    Py_XSETREF(self->want, want);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static PyObject *LazyLeaf_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    LazyLeaf *self = (LazyLeaf *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        self->vectorcall = LazyLeaf_vectorcall;
    }
    return (PyObject *)self;
}

static int LazyLeaf_traverse(LazyLeaf *self, visitproc visit, void *arg)
{
    Py_VISIT(self->field);
    Py_VISIT(self->want);
    Py_VISIT(self->fallback);
    return 0;
}

static int LazyLeaf_clear(LazyLeaf *self)
{
    PyMem_Free(self->v4_starts);
    PyMem_Free(self->v4_ends);
    self->v4_starts = self->v4_ends = NULL;
    self->n_v4 = 0;
    Py_CLEAR(self->field);
    Py_CLEAR(self->want);
    Py_CLEAR(self->fallback);
    return 0;
}

static void LazyLeaf_dealloc(LazyLeaf *self)
{
    PyObject_GC_UnTrack(self);
    LazyLeaf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject LazyLeafType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ruletag.rules._native.LazyLeaf",
    .tp_basicsize = sizeof(LazyLeaf),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "LazyLeaf(kind, field, want=None, op=None, fallback=None, cased=False): a "
              "lazy leaf (view, cache) -> bool in C (see ruletag.rules.matcher.leaves.lazy_fn).",
    .tp_new = LazyLeaf_new,
    .tp_init = (initproc)LazyLeaf_init,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LazyLeaf, vectorcall),
    .tp_traverse = (traverseproc)LazyLeaf_traverse,
    .tp_clear = (inquiry)LazyLeaf_clear,
    .tp_dealloc = (destructor)LazyLeaf_dealloc,
};

/* ------------------------------------------------------------------ follow_triggers */

/* follow_triggers(per_entry, triggered, fire_sets, out) -> [(k, key), ...]: the tuned
 * pre-filter's pass over the entries a trigger fired in (matcher.prefilter
 * py_follow_triggers is the reference). Per entry k (ascending): key = its pattern set as a
 * frozenset, counted in fire_sets (unless None); from the memo ``triggered``
 * (key -> (order, how, in_full, in_cold)): how 0 (nothing triggered) is skipped, how 1 and 2
 * (each rule checked by its trigger; some rules unchecked, decoded anyway) put ``order`` in
 * out[k]; anything else, or a key not memoised, is left to the caller. */
static PyObject *follow_triggers(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "follow_triggers(per_entry, triggered, fire_sets, out)");
        return NULL;
    }
    PyObject *per_entry = args[0], *triggered = args[1], *fire_sets = args[2], *out = args[3];
    if (!PyDict_Check(per_entry) || !PyDict_Check(triggered) || !PyDict_Check(out) ||
        (fire_sets != Py_None && !PyDict_Check(fire_sets))) {
        PyErr_SetString(PyExc_TypeError, "per_entry, triggered and out must be dicts, "
                                         "fire_sets a dict or None");
        return NULL;
    }
    PyObject *ks = PyDict_Keys(per_entry);
    if (ks == NULL || PyList_Sort(ks) < 0) {
        Py_XDECREF(ks);
        return NULL;
    }
    PyObject *left = PyList_New(0);
    Py_ssize_t n = PyList_GET_SIZE(ks);
    for (Py_ssize_t j = 0; left != NULL && j < n; j++) {
        PyObject *k = PyList_GET_ITEM(ks, j);
        PyObject *pats = PyDict_GetItemWithError(per_entry, k); /* borrowed */
        PyObject *key = pats == NULL ? NULL : PyFrozenSet_New(pats);
        if (key == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, k);
            }
            Py_CLEAR(left);
            break;
        }
        int rc = 0;
        if (fire_sets != Py_None) {
            PyObject *c = PyDict_GetItemWithError(fire_sets, key); /* borrowed */
            PyObject *c1 = c != NULL          ? PyNumber_Add(c, one)
                           : PyErr_Occurred() ? NULL
                                              : (Py_INCREF(one), one);
            rc = c1 == NULL ? -1 : PyDict_SetItem(fire_sets, key, c1);
            Py_XDECREF(c1);
        }
        PyObject *got = rc < 0 ? NULL : PyDict_GetItemWithError(triggered, key); /* borrowed */
        if (rc == 0 && got == NULL && PyErr_Occurred()) {
            rc = -1;
        }
        long how = -1;
        if (rc == 0 && got != NULL) {
            if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 4) {
                PyErr_SetString(PyExc_TypeError, "triggered: (order, how, in_full, in_cold)");
                rc = -1;
            } else if ((how = PyLong_AsLong(PyTuple_GET_ITEM(got, 1))) == -1 && PyErr_Occurred()) {
                rc = -1;
            }
        }
        if (rc == 0) {
            if (how == 1 || how == 2) {
                rc = PyDict_SetItem(out, k, PyTuple_GET_ITEM(got, 0));
            } else if (how != 0) {
                PyObject *pair = PyTuple_Pack(2, k, key);
                rc = pair == NULL ? -1 : PyList_Append(left, pair);
                Py_XDECREF(pair);
            }
        }
        Py_DECREF(key);
        if (rc < 0) {
            Py_CLEAR(left);
        }
    }
    Py_DECREF(ks);
    return left;
}

/* ------------------------------------------------------------------ holding */

/* The program operators (compiler.codegen: AND, OR, NOT, LAZY, ALL, ANY). */
enum { OP_AND, OP_OR, OP_NOT, OP_LAZY, OP_ALL, OP_ANY };

/* Deeper programs are refused (an error, not a crash): formulas are flattened, so real ones
 * nest a few levels. */
#define MAX_DEPTH 2000

typedef struct {
    PyObject *hits;  /* set of the scanned atoms that hit */
    PyObject *lazy;  /* dict: atom -> lazy leaf function (view, cache) -> bool */
    PyObject *view;
    PyObject *cache; /* dict: atom -> the lazy leaf's result */
} Holding;

/* L(i) of the generated code: the cached result of lazy leaf i, or its evaluation (cached). */
static int lazy_leaf(Holding *h, PyObject *i)
{
    PyObject *got = PyDict_GetItemWithError(h->cache, i); /* borrowed */
    if (got == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (got == NULL || got == Py_None) {
        PyObject *fn = PyDict_GetItemWithError(h->lazy, i); /* borrowed */
        if (fn == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, i);
            }
            return -1;
        }
        PyObject *args[2] = {h->view, h->cache};
        PyObject *r = PyObject_Vectorcall(fn, args, 2, NULL);
        if (r == NULL) {
            return -1;
        }
        int rc = PyDict_SetItem(h->cache, i, r);
        int t = rc < 0 ? -1 : PyObject_IsTrue(r);
        Py_DECREF(r);
        return t;
    }
    return PyObject_IsTrue(got);
}

/* not hits.isdisjoint(items): whether the sets share an item, looking the smaller one's
 * items up in the larger (as set.isdisjoint does, without its method call). 1, 0 or -1. */
static int any_common(PyObject *hits, PyObject *items)
{
    if (!PyAnySet_Check(items)) {
        PyObject *d = PyObject_CallMethodOneArg(hits, s_isdisjoint, items);
        if (d == NULL) {
            return -1;
        }
        int r = PyObject_IsTrue(d);
        Py_DECREF(d);
        return r < 0 ? r : !r;
    }
    PyObject *small = hits, *large = items;
    if (PySet_GET_SIZE(items) < PySet_GET_SIZE(hits)) {
        small = items;
        large = hits;
    }
    Py_ssize_t pos = 0;
    PyObject *key;
    Py_hash_t hash;
    while (_PySet_NextEntry(small, &pos, &key, &hash)) {
        int r = PySet_Contains(large, key);
        if (r != 0) {
            return r;
        }
    }
    return 0;
}

/* Does program node n hold? 1, 0, or -1 with an exception set. */
static int holds(Holding *h, PyObject *n, int depth)
{
    if (PyLong_CheckExact(n)) {
        return PySet_Contains(h->hits, n);
    }
    if (n == Py_True) {
        return 1;
    }
    if (n == Py_False) {
        return 0;
    }
    Py_ssize_t size = PyTuple_CheckExact(n) ? PyTuple_GET_SIZE(n) : 0;
    if (size == 1 && PyLong_CheckExact(PyTuple_GET_ITEM(n, 0))) {
        long op = PyLong_AsLong(PyTuple_GET_ITEM(n, 0)); /* And / Or of nothing */
        if (op == OP_AND || op == OP_OR) {
            return op == OP_AND;
        }
    }
    if (size < 2) {
        PyErr_SetString(PyExc_TypeError, "a rule program node must be an int, a bool or an "
                                         "operator tuple");
        return -1;
    }
    if (depth > MAX_DEPTH) {
        PyErr_SetString(PyExc_RecursionError, "rule program nested too deeply");
        return -1;
    }
    long op = PyLong_AsLong(PyTuple_GET_ITEM(n, 0));
    PyObject *arg = PyTuple_GET_ITEM(n, 1);
    int r;
    switch (op) {
    case OP_AND:
    case OP_OR:
        for (Py_ssize_t k = 1; k < size; k++) {
            r = holds(h, PyTuple_GET_ITEM(n, k), depth + 1);
            if (r < 0 || r == (op == OP_OR)) {
                return r; /* an error, or the first false of an And / true of an Or */
            }
        }
        return op == OP_AND;
    case OP_NOT:
        r = holds(h, arg, depth + 1);
        return r < 0 ? r : !r;
    case OP_LAZY:
        return lazy_leaf(h, arg);
    case OP_ALL:
        return PyObject_RichCompareBool(arg, h->hits, Py_LE);
    case OP_ANY:
        return any_common(h->hits, arg);
    default:
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "unknown rule program operator %ld", op);
        }
        return -1;
    }
}

static PyObject *holding_in(PyObject *rules_in, PyObject *programs, Holding *hp);

static PyObject *holding(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "holding(rules, programs, hits, lazy, view, cache)");
        return NULL;
    }
    Holding h = {args[2], args[3], args[4], args[5]};
    return holding_in(args[0], args[1], &h);
}

/* holding(rules, programs, ...) on the state h: the list of the rules whose program holds,
 * or NULL with an exception set. */
static PyObject *holding_in(PyObject *rules_in, PyObject *programs, Holding *hp)
{
    Holding h = *hp;
    if (!PyTuple_Check(programs) || !PyAnySet_Check(h.hits) || !PyDict_Check(h.lazy) ||
        !PyDict_Check(h.cache)) {
        PyErr_SetString(PyExc_TypeError,
                        "programs must be a tuple, hits a set, lazy and cache dicts");
        return NULL;
    }
    PyObject *rules = PySequence_Fast(rules_in, "rules must be a sequence");
    if (rules == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(rules), count = PyTuple_GET_SIZE(programs);
    for (Py_ssize_t j = 0; out != NULL && j < n; j++) {
        PyObject *k = PySequence_Fast_GET_ITEM(rules, j);
        Py_ssize_t i = PyLong_AsSsize_t(k);
        if (i < 0 || i >= count) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_IndexError, "rule index out of range");
            }
            Py_CLEAR(out);
            break;
        }
        int r = holds(&h, PyTuple_GET_ITEM(programs, i), 0);
        if (r < 0 || (r == 1 && PyList_Append(out, k) < 0)) {
            Py_CLEAR(out);
        }
    }
    Py_DECREF(rules);
    return out;
}

/* ------------------------------------------------------------------ evaluate */

/* The flattened record and the field values cache of view (new references): read from the
 * C state of a ViewBase (flat computed once, as _ViewMethods.flat does), else through
 * view.flat() and view.value_cache. 0, or -1 with an exception set. */
static int view_state(PyObject *view, PyObject **flat, PyObject **vcache)
{
    if (PyObject_TypeCheck(view, &ViewType)) {
        View *v = (View *)view;
        if (v->cache == NULL) {
            PyErr_SetString(PyExc_TypeError, "the record view is not initialised");
            return -1;
        }
        if ((v->flat == NULL || v->flat == Py_None) && view_full_flat(v) < 0) {
            return -1;
        }
        Py_INCREF(v->flat);
        Py_INCREF(v->cache);
        *flat = v->flat;
        *vcache = v->cache;
        return 0;
    }
    *flat = PyObject_CallMethod(view, "flat", NULL);
    if (*flat == NULL) {
        return -1;
    }
    *vcache = PyObject_GetAttrString(view, "value_cache");
    if (*vcache == NULL) {
        Py_CLEAR(*flat);
        return -1;
    }
    return 0;
}

/* evaluate(ctx, view, rules, groups): scan_groups of the field groups ``groups`` into a fresh
 * hits set, then holding() with a fresh lazy cache; one call per rule list, in place of the
 * Python frames between them. ctx: (spec, value cache, programs, lazy, limit, max_entries),
 * made once per matcher. */
static PyObject *evaluate(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "evaluate(ctx, view, rules, groups)");
        return NULL;
    }
    PyObject *ctx = args[0], *view = args[1], *groups = args[3];
    if (!PyTuple_Check(ctx) || PyTuple_GET_SIZE(ctx) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "ctx: (spec, value cache, programs, lazy, limit, max_entries)");
        return NULL;
    }
    PyObject *spec = PyTuple_GET_ITEM(ctx, 0), *cache = PyTuple_GET_ITEM(ctx, 1);
    PyObject *hits = PySet_New(NULL);
    if (hits == NULL) {
        return NULL;
    }
    PyObject *out = NULL, *lazy_cache = NULL;
    Py_ssize_t limit, max_entries;
    if (check_scan_args(hits, cache, PyTuple_GET_ITEM(ctx, 4), PyTuple_GET_ITEM(ctx, 5), &limit,
                        &max_entries) < 0) {
        goto done;
    }
    int any = PyObject_IsTrue(groups);
    if (any < 0) {
        goto done;
    }
    if (any) {
        PyObject *flat, *vcache;
        if (view_state(view, &flat, &vcache) < 0) {
            goto done;
        }
        int rc = scan_groups_in(groups, spec, view, flat, vcache, hits, cache, limit,
                                max_entries);
        Py_DECREF(flat);
        Py_DECREF(vcache);
        if (rc < 0) {
            goto done;
        }
    }
    if ((lazy_cache = PyDict_New()) != NULL) {
        Holding h = {hits, PyTuple_GET_ITEM(ctx, 3), view, lazy_cache};
        out = holding_in(args[2], PyTuple_GET_ITEM(ctx, 2), &h);
    }
done:
    Py_XDECREF(lazy_cache);
    Py_DECREF(hits);
    return out;
}

/* ------------------------------------------------------------------ match_loop */

/* The length in bytes of an entry's time from its first byte (matcher.table._TIME_LEN):
 * EventTime, floats and ints; 0 for anything else. */
static Py_ssize_t time_len(unsigned char t)
{
    if (t < 0x80) {
        return 1; /* positive fixint */
    }
    switch (t) {
    case 0xD7: return 10;
    case 0xCB: case 0xCF: case 0xD3: return 9;
    case 0xCA: case 0xCE: case 0xD2: return 5;
    case 0xCD: case 0xD1: return 3;
    case 0xCC: case 0xD0: return 2;
    default: return 0;
    }
}


/* The record map of the packed entry whole[s:e] (matcher.table._record_of; data: the bytes
 * of whole): a new reference, Py_None (no record, or bytes msgpack refuses), or NULL with an
 * exception set. The usual entry, a two-element array with a known time, has its record
 * decoded by ``unpackb`` alone; anything else is handed to the Python ``decode``. Both get a
 * slice of the memoryview ``whole``, which keeps the entries alive while anything holds it. */
static PyObject *record_of(PyObject *whole, const unsigned char *data, Py_ssize_t s,
                           Py_ssize_t e, PyObject *unpackb, PyObject *decode)
{
    const unsigned char *b = data + s;
    Py_ssize_t n = e - s;
    Py_ssize_t off = n > 2 && b[0] == 0x92 ? 1 + time_len(b[1]) : 0;
    PyObject *mv;
    if (off > 1) {
        mv = PySequence_GetSlice(whole, s + off, e);
        if (mv == NULL) {
            return NULL;
        }
        PyObject *args[4] = {mv, Py_False, s_surrogateescape, Py_False};
        PyObject *rec = PyObject_Vectorcall(unpackb, args, 1, unpack_kwnames);
        Py_DECREF(mv);
        if (rec == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                return NULL;
            }
            PyErr_Clear(); /* as the reference: bytes msgpack refuses are no record */
            Py_RETURN_NONE;
        }
        if (!PyDict_Check(rec)) {
            Py_DECREF(rec);
            Py_RETURN_NONE;
        }
        return rec;
    }
    mv = PySequence_GetSlice(whole, s, e);
    if (mv == NULL) {
        return NULL;
    }
    PyObject *rec = PyObject_CallOneArg(decode, mv);
    Py_DECREF(mv);
    return rec;
}

/* A view of the usual entry data[s:e] made from its record's bytes (flat_from: only the
 * paths the table reads are decoded, the record itself when first asked for): a new
 * reference, Py_None (not the usual entry, or flat_from does not decide: the caller decodes
 * the record), or NULL with an exception set. */
static PyObject *view_of_bytes(PathTable *paths, PyObject *whole, const unsigned char *data,
                               Py_ssize_t s, Py_ssize_t e, PyObject *unpackb,
                               PyObject *view_type, PyObject *fm)
{
    const unsigned char *b = data + s;
    Py_ssize_t n = e - s;
    Py_ssize_t off = n > 2 && b[0] == 0x92 ? 1 + time_len(b[1]) : 0;
    if (off <= 1) {
        Py_RETURN_NONE;
    }
    PyObject *flat = flat_from(paths, whole, data, s + off, e, unpackb);
    if (flat == NULL || flat == Py_None) {
        return flat;
    }
    PyObject *vargs[2] = {fm, Py_None};
    PyObject *view = PyObject_Vectorcall(view_type, vargs, 2, NULL);
    PyObject *raw = view == NULL ? NULL : PySequence_GetSlice(whole, s + off, e);
    if (raw == NULL) {
        Py_XDECREF(view);
        Py_DECREF(flat);
        return NULL;
    }
    if (!PyObject_TypeCheck(view, &ViewType)) {
        Py_DECREF(raw);
        Py_DECREF(view);
        Py_DECREF(flat);
        Py_RETURN_NONE;
    }
    View *v = (View *)view;
    Py_CLEAR(v->record);
    Py_XSETREF(v->flat, flat);
    Py_XSETREF(v->raw, raw);
    Py_INCREF(unpackb);
    Py_XSETREF(v->unpackb, unpackb);
    Py_INCREF(paths);
    Py_XSETREF(v->paths, (PyObject *)paths);
    v->partial = 1;
    return view;
}

/* [back[i] for i in got]: a new list, or NULL with an exception set. */
static PyObject *mapped_back(PyObject *got, PyObject *back)
{
    if (!PyList_Check(got) || !PyTuple_Check(back)) {
        PyErr_SetString(PyExc_TypeError, "evaluate must give a list, and back be a tuple");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(got);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(got, j));
        if (i < 0 || i >= PyTuple_GET_SIZE(back)) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_IndexError, "often-passed rule index out of range");
            }
            Py_DECREF(out);
            return NULL;
        }
        PyObject *r = PyTuple_GET_ITEM(back, i);
        Py_INCREF(r);
        PyList_SET_ITEM(out, j, r);
    }
    return out;
}

/* cold[r] += 1 for each r of rules (cold: a Counter, or any dict). */
static int count_into(PyObject *cold, PyObject *rules)
{
    Py_ssize_t n = PyTuple_GET_SIZE(rules);
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *r = PyTuple_GET_ITEM(rules, j);
        PyObject *c = PyDict_GetItemWithError(cold, r); /* borrowed */
        if (c == NULL && PyErr_Occurred()) {
            return -1;
        }
        PyObject *c1 = c == NULL ? (Py_INCREF(one), one) : PyNumber_Add(c, one);
        if (c1 == NULL) {
            return -1;
        }
        int rc = PyDict_SetItem(cold, r, c1);
        Py_DECREF(c1);
        if (rc < 0) {
            return -1;
        }
    }
    return 0;
}

/* The rules of one entry that match (a new list, possibly empty), or NULL with an exception
 * set: the loop body of matcher.table.Matcher._match_loop. */
static PyObject *entry_matches(PyObject *plan, PyObject *view, PyObject *own_eval,
                               PyObject *cold)
{
    if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != 6 ||
        !PyTuple_Check(PyTuple_GET_ITEM(plan, 4))) {
        PyErr_SetString(PyExc_TypeError, "a rule list's plan: (evaluate or None, mine, "
                                         "mine_groups, back, rest tuple, rest_groups)");
        return NULL;
    }
    PyObject *sub = PyTuple_GET_ITEM(plan, 0), *rest = PyTuple_GET_ITEM(plan, 4);
    PyObject *m;
    if (sub != Py_None) {
        PyObject *args[3] = {view, PyTuple_GET_ITEM(plan, 1), PyTuple_GET_ITEM(plan, 2)};
        PyObject *got = PyObject_Vectorcall(sub, args, 3, NULL);
        if (got == NULL) {
            return NULL;
        }
        m = mapped_back(got, PyTuple_GET_ITEM(plan, 3));
        Py_DECREF(got);
    } else {
        m = PyList_New(0);
    }
    if (m == NULL || PyTuple_GET_SIZE(rest) == 0) {
        return m;
    }
    PyObject *args[3] = {view, rest, PyTuple_GET_ITEM(plan, 5)};
    PyObject *more = PyObject_Vectorcall(own_eval, args, 3, NULL);
    if (more == NULL || !PyList_Check(more)) {
        if (more != NULL) {
            Py_DECREF(more);
            PyErr_SetString(PyExc_TypeError, "evaluate must give a list");
        }
        Py_DECREF(m);
        return NULL;
    }
    if (PyList_GET_SIZE(more) > 0) {
        if (PyList_GET_SIZE(m) == 0) {
            Py_SETREF(m, more);
            more = NULL;
        } else if (PyList_SetSlice(m, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, more) < 0 ||
                   PyList_Sort(m) < 0) {
            Py_CLEAR(m);
        }
    }
    Py_XDECREF(more);
    if (m != NULL && cold != Py_None && count_into(cold, rest) < 0) {
        Py_CLEAR(m);
    }
    return m;
}

/* match_loop(todo, cands, plans, make_plan, entries, spans, records, view_type, fieldmap,
 * own_eval, cold, unpackb, decode, out): Matcher._match_loop's loop over the entries, in C.
 * Fills out {entry index: [matching rule indexes]} (entries with a match only). */
static PyObject *match_loop(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 15 || (args[14] != Py_None && !PyObject_TypeCheck(args[14], &PathTableType))) {
        PyErr_SetString(PyExc_TypeError,
                        "match_loop(todo, cands, plans, make_plan, entries, spans, records, "
                        "view_type, fieldmap, own_eval, cold, unpackb, decode, out, paths: "
                        "PathTable or None)");
        return NULL;
    }
    PathTable *paths = args[14] == Py_None ? NULL : (PathTable *)args[14];
    PyObject *todo = args[0], *cands = args[1], *plans = args[2], *make_plan = args[3],
             *spans = args[5], *records = args[6], *view_type = args[7], *fm = args[8],
             *own_eval = args[9], *cold = args[10], *unpackb = args[11], *decode = args[12],
             *out = args[13];
    if (!PyDict_Check(cands) || !PyDict_Check(plans) || !PyDict_Check(out) ||
        (cold != Py_None && !PyDict_Check(cold))) {
        PyErr_SetString(PyExc_TypeError, "cands, plans and out must be dicts, cold a dict or None");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[4], &buf, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *whole = PyMemoryView_FromObject(args[4]);
    PyObject *it = whole == NULL ? NULL : PyObject_GetIter(todo);
    if (it == NULL) {
        Py_XDECREF(whole);
        PyBuffer_Release(&buf);
        return NULL;
    }
    static PyObject *empty = NULL;
    if (empty == NULL && (empty = PyTuple_New(0)) == NULL) {
        goto fail;
    }
    PyObject *k;
    while ((k = PyIter_Next(it)) != NULL) {
        PyObject *record = NULL, *view = NULL, *plan = NULL, *m = NULL;
        PyObject *rules = PyDict_GetItemWithError(cands, k); /* borrowed */
        if (rules == NULL) {
            if (PyErr_Occurred()) {
                goto next;
            }
            rules = empty;
        }
        plan = PyDict_GetItemWithError(plans, rules);
        if (plan != NULL) {
            Py_INCREF(plan);
        } else if (PyErr_Occurred() || (plan = PyObject_CallOneArg(make_plan, rules)) == NULL) {
            goto next;
        }
        if (records != Py_None) {
            record = PyObject_GetItem(records, k);
        } else {
            PyObject *span = PyObject_GetItem(spans, k);
            Py_ssize_t s = -1, e = -1;
            if (span != NULL && PyTuple_Check(span) && PyTuple_GET_SIZE(span) == 2) {
                s = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 0));
                e = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
            }
            Py_XDECREF(span);
            if (span == NULL || PyErr_Occurred()) {
                goto next;
            }
            if (s < 0 || e < s || e > buf.len) {
                PyErr_SetString(PyExc_ValueError, "an entry span must be (start, end) inside "
                                                  "the entries");
                goto next;
            }
            if (paths != NULL && (view = view_of_bytes(paths, whole, (const unsigned char *)buf.buf,
                                                       s, e, unpackb, view_type, fm)) == NULL) {
                goto next;
            }
            if (view == Py_None) {
                Py_CLEAR(view);
            }
            if (view == NULL) {
                record = record_of(whole, (const unsigned char *)buf.buf, s, e, unpackb, decode);
            }
        }
        if (view == NULL) {
            if (record == NULL || record == Py_None) {
                goto next;
            }
            PyObject *vargs[2] = {fm, record};
            if ((view = PyObject_Vectorcall(view_type, vargs, 2, NULL)) == NULL) {
                goto next;
            }
        }
        m = entry_matches(plan, view, own_eval, cold);
        if (m != NULL && PyList_GET_SIZE(m) > 0 && PyDict_SetItem(out, k, m) < 0) {
            Py_CLEAR(m);
        }
    next:
        Py_DECREF(k);
        Py_XDECREF(plan);
        Py_XDECREF(record);
        Py_XDECREF(view);
        if (m == NULL && PyErr_Occurred()) {
            goto fail;
        }
        Py_XDECREF(m);
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    Py_DECREF(it);
    Py_DECREF(whole);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
fail:
    Py_DECREF(it);
    Py_DECREF(whole);
    PyBuffer_Release(&buf);
    return NULL;
}

/* ------------------------------------------------------------------ module */

PyObject *json_entry(PyObject *self, PyObject *arg); /* _jsonpack.c */
void jsonpack_init(void);
PyObject *json_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef methods[] = {
    {"flatten_record", (PyCFunction)flatten_record, METH_O,
     "flatten_record(record) -> {dotted path: [values]} (see ruletag.rules.fields)."},
    {"scan_cached", (PyCFunction)(void (*)(void))scan_cached, METH_FASTCALL,
     "scan_cached(key, values, hits, cache, miss, limit, max_entries): see "
     "ruletag.rules.matcher.table.py_scan_cached."},
    {"holding", (PyCFunction)(void (*)(void))holding, METH_FASTCALL,
     "holding(rules, programs, hits, lazy, view, cache) -> the rules whose program holds: "
     "see ruletag.rules.matcher.table.Matcher._holding."},
    {"evaluate", (PyCFunction)(void (*)(void))evaluate, METH_FASTCALL,
     "evaluate(ctx, view, rules, groups) -> the rules whose formula holds: see "
     "ruletag.rules.matcher.table.Matcher._evaluate."},
    {"match_loop", (PyCFunction)(void (*)(void))match_loop, METH_FASTCALL,
     "match_loop(todo, cands, plans, make_plan, entries, spans, records, view_type, fieldmap, "
     "own_eval, cold, unpackb, decode, out, paths): see "
     "ruletag.rules.matcher.table.py_match_loop."},
    {"flat_of", (PyCFunction)(void (*)(void))flat_of, METH_FASTCALL,
     "flat_of(paths, data, unpackb) -> flatten_record(unpackb(data)) at the wanted paths of "
     "paths, or None where that is not decided here: see ruletag.rules.matcher.table.py_flat_of."},
    {"follow_triggers", (PyCFunction)(void (*)(void))follow_triggers, METH_FASTCALL,
     "follow_triggers(per_entry, triggered, fire_sets, out) -> [(k, key), ...] left to the "
     "caller: see ruletag.rules.matcher.prefilter.py_follow_triggers."},
    {"scan_groups", (PyCFunction)(void (*)(void))scan_groups, METH_FASTCALL,
     "scan_groups(todo, spec, view, flat, vcache, hits, cache, limit, max_entries): see "
     "ruletag.rules.matcher.table.py_scan_groups."},
    {"json_entry", (PyCFunction)json_entry, METH_O,
     "json_entry(text) -> msgpack.packb([0, ujson.loads(text)]) for a JSON object text, or None "
     "where that is left to ujson (see _jsonpack.c)."},
    {"json_block", (PyCFunction)(void (*)(void))json_block, METH_FASTCALL,
     "json_block(data, start, end, most, base) -> (entries, spans, lines, nlines, stop): the "
     "JSON object lines of data[start:end] packed as by json_entry (spans counted from base), "
     "up to the first line json_entry leaves or ``most`` records (see _jsonpack.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "ruletag's matcher helpers in C (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&AdderType) < 0 || PyType_Ready(&EntryHitsType) < 0 ||
        PyType_Ready(&LazyLeafType) < 0 || PyType_Ready(&PathTableType) < 0 ||
        PyType_Ready(&ViewType) < 0) {
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {{&s_dotted, "dotted"}, {&s_spec, "spec"},
                 {&s_values, "values"}, {&s_lower, "lower"},
                 {&s_plan, "_plan"}, {&s_plans, "_plans"},
                 {&s_ecs_category, "ecs_category"},
                 {&s_ecs_type, "ecs_type"}, {&s_isdisjoint, "isdisjoint"},
                 {&s_surrogateescape, "surrogateescape"}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL) {
            return NULL;
        }
    }
    if (unpack_kwnames == NULL &&
        (unpack_kwnames = Py_BuildValue("(sss)", "raw", "unicode_errors", "strict_map_key")) ==
            NULL) {
        return NULL;
    }
    if (one == NULL && (one = PyLong_FromLong(1)) == NULL) {
        return NULL;
    }
    jsonpack_init();
    PyObject *abc = PyImport_ImportModule("collections.abc");
    if (abc == NULL) {
        return NULL;
    }
    Mapping = PyObject_GetAttrString(abc, "Mapping");
    Py_DECREF(abc);
    if (Mapping == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&AdderType);
    Py_INCREF(&LazyLeafType);
    Py_INCREF(&EntryHitsType);
    Py_INCREF(&ViewType);
    Py_INCREF(&PathTableType);
    if (PyModule_AddObject(m, "PathTable", (PyObject *)&PathTableType) < 0 ||
        PyModule_AddObject(m, "Adder", (PyObject *)&AdderType) < 0 ||
        PyModule_AddObject(m, "LazyLeaf", (PyObject *)&LazyLeafType) < 0 ||
        PyModule_AddObject(m, "EntryHits", (PyObject *)&EntryHitsType) < 0 ||
        PyModule_AddObject(m, "ViewBase", (PyObject *)&ViewType) < 0 ||
        PyModule_AddIntConstant(m, "ABI", 7) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
