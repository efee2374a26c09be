/*
 * tmb.attest._imafast: the IMA replay's hot loops in C (optional; tmb/attest/pcr.py falls back to its
 * own Python loops when this does not build or TMB_IMA_NATIVE=0).
 *
 * hot_binary() walks binary measurement-list records for as long as each one is the common case: for
 * the expected PCR, with one of the given template tags (u32 name length + name), inside the buffer,
 * and with SHA-1(template data) equal to its template hash. hot_ascii() does the same for ascii lines
 * (ima-ng, ima-sig, ima-buf), rebuilding the template data each line stands for. Both extend the
 * running SHA-1 value (and, for a second bank, that bank's value) and stop at the first record that is
 * not so, or right after an extend that makes a running value equal a watch value. Everything else
 * (findings, positions, the match check) stays in Python, which hands every record these refuse to the
 * general parser: the results are those of the Python loops whichever records the C loops take.
 *
 * Every read is bounds-checked against the buffer (or the line); lengths are compared before they are
 * added. The loops run without the GIL on copies of the small inputs, on bytes objects the call's
 * argument tuple keeps alive and on a buffer view held for the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#define SHA1_LEN 20
#define MAX_MD 64   /* SHA-512 */
#define MAX_TAGS 64 /* the templates of one log; pcr.py passes those of one name length */

static const EVP_MD *md_sha1, *md_sha256, *md_sha384, *md_sha512;

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int
digest(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *data, size_t len, unsigned char *out)
{
    return EVP_DigestInit_ex(ctx, md, NULL) && EVP_DigestUpdate(ctx, data, len) &&
           EVP_DigestFinal_ex(ctx, out, NULL);
}

/* H(value || part1 || part2): an extend, into ``value``. */
static int
extend(EVP_MD_CTX *ctx, const EVP_MD *md, unsigned char *value, size_t vlen, const unsigned char *p1,
       size_t l1, const unsigned char *p2, size_t l2)
{
    return EVP_DigestInit_ex(ctx, md, NULL) && EVP_DigestUpdate(ctx, value, vlen) &&
           EVP_DigestUpdate(ctx, p1, l1) && (l2 == 0 || EVP_DigestUpdate(ctx, p2, l2)) &&
           EVP_DigestFinal_ex(ctx, value, NULL);
}

static const EVP_MD *
bank_md(const char *name, size_t *size)
{
    if (strcmp(name, "sha256") == 0) {
        *size = 32;
        return md_sha256;
    }
    if (strcmp(name, "sha384") == 0) {
        *size = 48;
        return md_sha384;
    }
    if (strcmp(name, "sha512") == 0) {
        *size = 64;
        return md_sha512;
    }
    return NULL;
}

/* The running values of one call: SHA-1 ``v1`` and the optional second bank ``v2`` (``md2``), extended
 * per record, and the watch values ``t1``/``t2`` (empty: nothing to watch). */
typedef struct {
    unsigned char v1[SHA1_LEN], v2[MAX_MD];
    const EVP_MD *md2; /* NULL: SHA-1 alone */
    size_t size2;
    int per_bank;
    const char *t1, *t2, *v2_in;
    Py_ssize_t t1_len, t2_len, v2_len;
} Run;

static int
run_init(Run *r, const char *v1, Py_ssize_t v1_len, const char *v2, Py_ssize_t v2_len, PyObject *bank2,
         int per_bank, const char *t1, Py_ssize_t t1_len, const char *t2, Py_ssize_t t2_len)
{
    memset(r, 0, sizeof(*r));
    if (v1_len != SHA1_LEN || (t1_len != 0 && t1_len != SHA1_LEN)) {
        PyErr_SetString(PyExc_ValueError, "v1 (and t1 unless empty) must be 20 bytes");
        return -1;
    }
    memcpy(r->v1, v1, SHA1_LEN);
    r->per_bank = per_bank;
    r->t1 = t1, r->t1_len = t1_len, r->t2 = t2, r->t2_len = t2_len, r->v2_in = v2, r->v2_len = v2_len;
    if (bank2 == Py_None)
        return 0;
    const char *name = PyUnicode_Check(bank2) ? PyUnicode_AsUTF8(bank2) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "bank2 must be a bank name or None");
        return -1;
    }
    r->md2 = bank_md(name, &r->size2);
    if (r->md2 == NULL) {
        PyErr_Format(PyExc_ValueError, "unsupported second bank %R", bank2);
        return -1;
    }
    if ((size_t)v2_len != r->size2 || (t2_len != 0 && (size_t)t2_len != r->size2)) {
        PyErr_Format(PyExc_ValueError, "v2 (and t2 unless empty) must be %zu bytes", r->size2);
        return -1;
    }
    memcpy(r->v2, v2, r->size2);
    return 0;
}

/* Extend with the template hash ``d`` and, for a per-bank second bank, its hash of the data ``h``.
 * Returns -1 when OpenSSL failed, 1 when a running value now equals its watch value, else 0. */
static int
run_extend(Run *r, EVP_MD_CTX *ctx, const unsigned char *d, const unsigned char *h)
{
    static const unsigned char zeros[MAX_MD] = {0};
    if (!extend(ctx, md_sha1, r->v1, SHA1_LEN, d, SHA1_LEN, NULL, 0))
        return -1;
    int hit = r->t1_len && memcmp(r->v1, r->t1, SHA1_LEN) == 0;
    if (r->md2 != NULL) {
        int ok = r->per_bank ? extend(ctx, r->md2, r->v2, r->size2, h, r->size2, NULL, 0)
                             : extend(ctx, r->md2, r->v2, r->size2, d, SHA1_LEN, zeros, r->size2 - SHA1_LEN);
        if (!ok)
            return -1;
        hit = hit || (r->t2_len && memcmp(r->v2, r->t2, r->size2) == 0);
    }
    return hit;
}

static PyObject *
run_result(Run *r, Py_ssize_t pos, Py_ssize_t count, int hit)
{
    return Py_BuildValue("(nny#y#O)", pos, count, (const char *)r->v1, (Py_ssize_t)SHA1_LEN,
                         r->md2 != NULL ? (const char *)r->v2 : r->v2_in,
                         r->md2 != NULL ? (Py_ssize_t)r->size2 : r->v2_len, hit ? Py_True : Py_False);
}

PyDoc_STRVAR(hot_binary_doc,
"hot_binary(buf, pos, limit, pcr, tags, v1, v2, bank2, per_bank, t1, t2)\n"
"    -> (pos, entries, v1, v2, hit)\n\n"
"Replay the common binary records of ``buf`` from ``pos`` while ``pos <= limit``: each one for PCR\n"
"``pcr``, its template tag one of ``tags`` (bytes of one length: u32 name length + name), inside\n"
"``buf``, and its template hash equal to SHA-1 of its data. ``v1`` is the running SHA-1 value;\n"
"``bank2`` (None, 'sha256', 'sha384' or 'sha512') the second bank, whose running value ``v2`` is\n"
"extended with its hash of the data (``per_bank``) or the template hash zero-padded. Stops at the\n"
"first other record, or after an extend that makes ``v1 == t1`` or ``v2 == t2`` (``hit``; an empty\n"
"watch value watches nothing). Returns the position after the last record taken, their count and\n"
"the running values.");

static PyObject *
hot_binary(PyObject *self, PyObject *args)
{
    Py_buffer buf = {0};
    Py_ssize_t pos, limit, pcr;
    PyObject *tags, *bank2;
    const char *v1, *v2, *t1, *t2;
    Py_ssize_t v1_len, v2_len, t1_len, t2_len;
    int per_bank;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nnnO!y#y#Opy#y#:hot_binary", &buf, &pos, &limit, &pcr, &PyTuple_Type,
                          &tags, &v1, &v1_len, &v2, &v2_len, &bank2, &per_bank, &t1, &t1_len, &t2, &t2_len))
        return NULL;

    PyObject *result = NULL;
    const unsigned char *tag_ptr[MAX_TAGS];
    Py_ssize_t ntags = PyTuple_GET_SIZE(tags), tag_len = 0;
    Run r;

    if (pos < 0 || pos > buf.len) {
        PyErr_SetString(PyExc_ValueError, "pos must lie within the buffer");
        goto done;
    }
    if (pcr < 0 || pcr > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pcr must be a u32");
        goto done;
    }
    if (ntags > MAX_TAGS) {
        PyErr_SetString(PyExc_ValueError, "too many template tags");
        goto done;
    }
    for (Py_ssize_t i = 0; i < ntags; i++) {
        PyObject *t = PyTuple_GET_ITEM(tags, i);
        if (!PyBytes_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "tags must be bytes");
            goto done;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(t);
        if (i == 0)
            tag_len = n;
        if (n != tag_len || n < 4 || n > 4 + 255) {
            PyErr_SetString(PyExc_ValueError, "tags must be of one length, 4 to 259 bytes");
            goto done;
        }
        tag_ptr[i] = (const unsigned char *)PyBytes_AS_STRING(t);
    }
    if (run_init(&r, v1, v1_len, v2, v2_len, bank2, per_bank, t1, t1_len, t2, t2_len) < 0)
        goto done;

    const unsigned char *b = (const unsigned char *)buf.buf;
    const Py_ssize_t size = buf.len;
    /* pcr, template hash, tag, u32 data length: at most 24 + 259 + 4 bytes, no overflow */
    const Py_ssize_t hlen = 24 + tag_len + 4;
    Py_ssize_t count = 0;
    int hit = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    unsigned char d[SHA1_LEN], h[MAX_MD];
    while (ntags > 0 && pos <= limit && hlen <= size - pos) {
        const unsigned char *rec = b + pos;
        if (le32(rec) != (uint32_t)pcr)
            break;
        const unsigned char *name = rec + 24;
        Py_ssize_t i = 0;
        while (i < ntags && memcmp(name, tag_ptr[i], (size_t)tag_len) != 0)
            i++;
        if (i == ntags)
            break;
        uint32_t dlen = le32(rec + 24 + tag_len);
        Py_ssize_t start = pos + hlen;
        if ((uint64_t)dlen > (uint64_t)(size - start))
            break;
        const unsigned char *data = b + start;
        if (!digest(ctx, md_sha1, data, dlen, d)) {
            hit = -1;
            break;
        }
        if (memcmp(d, rec + 4, SHA1_LEN) != 0) /* a mismatch, or a violation: the general path */
            break;
        if (r.md2 != NULL && r.per_bank && !digest(ctx, r.md2, data, dlen, h)) {
            hit = -1;
            break;
        }
        pos = start + (Py_ssize_t)dlen;
        count++;
        hit = run_extend(&r, ctx, d, h);
        if (hit)
            break;
    }
    Py_END_ALLOW_THREADS

    EVP_MD_CTX_free(ctx);
    if (hit < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
        goto done;
    }
    result = run_result(&r, pos, count, hit);
done:
    PyBuffer_Release(&buf);
    return result;
}

/* Hex digit values (either case); 0xff for every other byte. Filled at import. */
static unsigned char hexval[256];

static void
hex_init(void)
{
    memset(hexval, 0xff, sizeof(hexval));
    for (int i = 0; i < 10; i++)
        hexval['0' + i] = (unsigned char)i;
    for (int i = 0; i < 6; i++)
        hexval['a' + i] = hexval['A' + i] = (unsigned char)(10 + i);
}

/* ``n`` hex digits (n even) into n / 2 bytes; 0 when one is not a hex digit. */
static int
unhex(const unsigned char *s, size_t n, unsigned char *out)
{
    unsigned bad = 0;
    for (size_t i = 0; i < n; i += 2) {
        unsigned hi = hexval[s[i]], lo = hexval[s[i + 1]];
        bad |= hi | lo;
        out[i / 2] = (unsigned char)(hi << 4 | (lo & 0xf));
    }
    return bad < 16;
}

static int
hex_ok(const unsigned char *s, size_t n)
{
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= hexval[s[i]];
    return bad < 16;
}

/* Feed the template data to the SHA-1 context and, where given, the second bank's. */
static int
feed(EVP_MD_CTX *a, EVP_MD_CTX *b, const void *p, size_t n)
{
    return EVP_DigestUpdate(a, p, n) && (b == NULL || EVP_DigestUpdate(b, p, n));
}

static void
put32(unsigned char *out, uint32_t v)
{
    out[0] = (unsigned char)v, out[1] = (unsigned char)(v >> 8), out[2] = (unsigned char)(v >> 16),
    out[3] = (unsigned char)(v >> 24);
}

#define MAX_ALGS 64

typedef struct {
    const unsigned char *name, *prefix;
    size_t name_len, prefix_len, hex_len;
} Alg;

PyDoc_STRVAR(hot_ascii_doc,
"hot_ascii(buf, pos, pcr_tag, algs, v1, v2, bank2, per_bank, t1, t2) -> (pos, entries, v1, v2, hit)\n\n"
"Replay the common ascii lines of ``buf`` from ``pos``: each one whole (ending in a newline, no CR),\n"
"``<pcr_tag> <template hash> <ima-ng|ima-sig|ima-buf> <alg>:<digest> <path>[ <hex>]``, its algorithm\n"
"one of ``algs`` ((name, d-ng field head, hex digits), ...), and its template hash equal to SHA-1 of\n"
"the template data the line stands for. Banks, watch values and the result as for hot_binary.");

static PyObject *
hot_ascii(PyObject *self, PyObject *args)
{
    Py_buffer buf = {0};
    Py_ssize_t pos;
    PyObject *algs_obj, *bank2;
    const char *tag, *v1, *v2, *t1, *t2;
    Py_ssize_t tag_len, v1_len, v2_len, t1_len, t2_len;
    int per_bank;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*ny#O!y#y#Opy#y#:hot_ascii", &buf, &pos, &tag, &tag_len, &PyTuple_Type,
                          &algs_obj, &v1, &v1_len, &v2, &v2_len, &bank2, &per_bank, &t1, &t1_len, &t2, &t2_len))
        return NULL;

    PyObject *result = NULL;
    Alg algs[MAX_ALGS];
    Py_ssize_t nalgs = PyTuple_GET_SIZE(algs_obj);
    Run r;

    if (pos < 0 || pos > buf.len) {
        PyErr_SetString(PyExc_ValueError, "pos must lie within the buffer");
        goto done;
    }
    if (nalgs > MAX_ALGS) {
        PyErr_SetString(PyExc_ValueError, "too many digest algorithms");
        goto done;
    }
    for (Py_ssize_t i = 0; i < nalgs; i++) {
        PyObject *a = PyTuple_GET_ITEM(algs_obj, i), *name, *prefix, *hex;
        if (!PyTuple_Check(a) || PyTuple_GET_SIZE(a) != 3 || !PyBytes_Check(name = PyTuple_GET_ITEM(a, 0)) ||
            !PyBytes_Check(prefix = PyTuple_GET_ITEM(a, 1)) || !PyLong_Check(hex = PyTuple_GET_ITEM(a, 2))) {
            PyErr_SetString(PyExc_TypeError, "algs must be (bytes, bytes, int) tuples");
            goto done;
        }
        long hex_len = PyLong_AsLong(hex);
        if (hex_len < 0 || hex_len > 2 * MAX_MD || hex_len % 2) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "an algorithm's hex digits must be even, at most 128");
            goto done;
        }
        algs[i] = (Alg){(const unsigned char *)PyBytes_AS_STRING(name),
                        (const unsigned char *)PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(name),
                        (size_t)PyBytes_GET_SIZE(prefix), (size_t)hex_len};
    }
    if (run_init(&r, v1, v1_len, v2, v2_len, bank2, per_bank, t1, t1_len, t2, t2_len) < 0)
        goto done;

    const unsigned char *b = (const unsigned char *)buf.buf;
    const Py_ssize_t size = buf.len;
    Py_ssize_t count = 0;
    int hit = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new(), *ctx2 = EVP_MD_CTX_new();
    if (ctx == NULL || ctx2 == NULL) {
        EVP_MD_CTX_free(ctx);
        EVP_MD_CTX_free(ctx2);
        PyErr_NoMemory();
        goto done;
    }
    EVP_MD_CTX *c2 = r.md2 != NULL && r.per_bank ? ctx2 : NULL;

    Py_BEGIN_ALLOW_THREADS
    static const unsigned char nul = 0;
    unsigned char th[SHA1_LEN], dig[MAX_MD], d[SHA1_LEN], h[MAX_MD], len4[4], chunk[256], small[1024];
    while (pos < size) {
        const unsigned char *line = b + pos;
        const unsigned char *eol = memchr(line, '\n', (size_t)(size - pos));
        if (eol == NULL || memchr(line, '\r', (size_t)(eol - line)) != NULL)
            break; /* a line the buffer cuts, or CR line ends: the general path */
        /* five fields: the first four end at a space, the path takes the rest */
        const unsigned char *f[5], *p = line;
        size_t fl[5];
        int k = 0;
        for (; k < 4; k++) {
            const unsigned char *sp = memchr(p, ' ', (size_t)(eol - p));
            if (sp == NULL)
                break;
            f[k] = p, fl[k] = (size_t)(sp - p), p = sp + 1;
        }
        if (k < 4)
            break;
        f[4] = p, fl[4] = (size_t)(eol - p);
        if (fl[0] != (size_t)tag_len || memcmp(f[0], tag, fl[0]) != 0)
            break;
        if (fl[1] != 2 * SHA1_LEN || !unhex(f[1], fl[1], th))
            break;
        int with_tail;
        if (fl[2] == 6 && memcmp(f[2], "ima-ng", 6) == 0)
            with_tail = 0;
        else if (fl[2] == 7 && (memcmp(f[2], "ima-sig", 7) == 0 || memcmp(f[2], "ima-buf", 7) == 0))
            with_tail = 1;
        else
            break; /* the legacy template, ima-modsig, others: the general path */
        const unsigned char *colon = memchr(f[3], ':', fl[3]);
        if (colon == NULL)
            break;
        size_t alen = (size_t)(colon - f[3]), hlen = fl[3] - alen - 1;
        const Alg *alg = NULL;
        for (Py_ssize_t i = 0; i < nalgs && alg == NULL; i++)
            if (algs[i].name_len == alen && memcmp(algs[i].name, f[3], alen) == 0)
                alg = &algs[i];
        if (alg == NULL || alg->hex_len != hlen || !unhex(colon + 1, hlen, dig))
            break;
        const unsigned char *path = f[4], *tail = NULL;
        size_t plen = fl[4], tlen = 0;
        if (with_tail) {
            const unsigned char *sp = NULL;
            for (size_t i = plen; i > 0 && sp == NULL; i--)
                if (path[i - 1] == ' ')
                    sp = path + i - 1;
            if (sp == NULL)
                break;
            tail = sp + 1, tlen = (size_t)(eol - tail), plen = (size_t)(sp - path);
            if (tlen % 2 || !hex_ok(tail, tlen))
                break;
        }
        if (plen >= UINT32_MAX || tlen / 2 > UINT32_MAX)
            break;
        /* the template data: d-ng field, path field (path + NUL), and the sig or buf field; built in
         * ``small`` when it fits (one digest call), else fed piece by piece */
        size_t total = alg->prefix_len + hlen / 2 + 4 + plen + 1 + (with_tail ? 4 + tlen / 2 : 0);
        int ok;
        if (total <= sizeof(small) && alg->prefix_len <= sizeof(small)) {
            unsigned char *o = small;
            memcpy(o, alg->prefix, alg->prefix_len), o += alg->prefix_len;
            memcpy(o, dig, hlen / 2), o += hlen / 2;
            put32(o, (uint32_t)(plen + 1)), o += 4;
            memcpy(o, path, plen), o += plen;
            *o++ = 0;
            if (with_tail) {
                put32(o, (uint32_t)(tlen / 2)), o += 4;
                unhex(tail, tlen, o); /* checked above */
            }
            ok = digest(ctx, md_sha1, small, total, d) && (c2 == NULL || digest(c2, r.md2, small, total, h));
        } else {
            ok = EVP_DigestInit_ex(ctx, md_sha1, NULL) && (c2 == NULL || EVP_DigestInit_ex(c2, r.md2, NULL)) &&
                 feed(ctx, c2, alg->prefix, alg->prefix_len) && feed(ctx, c2, dig, hlen / 2);
            put32(len4, (uint32_t)(plen + 1));
            ok = ok && feed(ctx, c2, len4, 4) && feed(ctx, c2, path, plen) && feed(ctx, c2, &nul, 1);
            if (with_tail) {
                put32(len4, (uint32_t)(tlen / 2));
                ok = ok && feed(ctx, c2, len4, 4);
                for (size_t i = 0; ok && i < tlen; i += 2 * sizeof(chunk)) {
                    size_t n = tlen - i < 2 * sizeof(chunk) ? tlen - i : 2 * sizeof(chunk);
                    ok = unhex(tail + i, n, chunk) && feed(ctx, c2, chunk, n / 2);
                }
            }
            ok = ok && EVP_DigestFinal_ex(ctx, d, NULL) && (c2 == NULL || EVP_DigestFinal_ex(c2, h, NULL));
        }
        if (!ok) {
            hit = -1;
            break;
        }
        if (memcmp(d, th, SHA1_LEN) != 0)
            break; /* a mismatch, or a violation: the general path */
        pos = (Py_ssize_t)(eol - b) + 1;
        count++;
        hit = run_extend(&r, ctx, d, h);
        if (hit)
            break;
    }
    Py_END_ALLOW_THREADS

    EVP_MD_CTX_free(ctx);
    EVP_MD_CTX_free(ctx2);
    if (hit < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
        goto done;
    }
    result = run_result(&r, pos, count, hit);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"hot_binary", hot_binary, METH_VARARGS, hot_binary_doc},
    {"hot_ascii", hot_ascii, METH_VARARGS, hot_ascii_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_imafast", "The IMA replay's hot loops (see tmb/attest/pcr.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__imafast(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* Fetched once: the implicit fetch of EVP_sha1() and friends costs a lookup per digest. */
    md_sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    md_sha384 = EVP_MD_fetch(NULL, "SHA384", NULL);
    md_sha512 = EVP_MD_fetch(NULL, "SHA512", NULL);
#else
    md_sha1 = EVP_sha1();
    md_sha256 = EVP_sha256();
    md_sha384 = EVP_sha384();
    md_sha512 = EVP_sha512();
#endif
    hex_init();
    if (md_sha1 == NULL || md_sha256 == NULL || md_sha384 == NULL || md_sha512 == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL lacks SHA-1 or SHA-2 digests");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_TAGS", MAX_TAGS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
