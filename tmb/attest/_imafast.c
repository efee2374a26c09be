/*
 * tmb.attest._imafast: the binary IMA replay's hot loop in C (optional; tmb/attest/pcr.py falls back to
 * its own Python loop when this does not build or TMB_IMA_NATIVE=0).
 *
 * hot_binary() walks binary measurement-list records for as long as each one is the common case: for
 * the expected PCR, with one of the given template tags (u32 name length + name), inside the buffer,
 * and with SHA-1(template data) equal to its template hash. It extends the running SHA-1 value (and,
 * for a second bank, that bank's value) and stops at the first record that is not so, or right after
 * an extend that makes a running value equal a watch value. Everything else (findings, positions,
 * the match check) stays in Python, which makes the results those of the Python loop by construction.
 *
 * Every read is bounds-checked against the buffer; lengths are compared before they are added. The
 * loop runs without the GIL on copies of the small inputs and on a buffer view held for the call.
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
    PyObject *tags, *bank2_obj;
    const char *v1_in, *v2_in, *t1, *t2;
    Py_ssize_t v1_len, v2_len, t1_len, t2_len;
    int per_bank;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nnnO!y#y#Opy#y#:hot_binary", &buf, &pos, &limit, &pcr, &PyTuple_Type,
                          &tags, &v1_in, &v1_len, &v2_in, &v2_len, &bank2_obj, &per_bank, &t1, &t1_len,
                          &t2, &t2_len))
        return NULL;

    PyObject *result = NULL;
    const unsigned char *tag_ptr[MAX_TAGS];
    Py_ssize_t ntags = PyTuple_GET_SIZE(tags), tag_len = 0;
    const EVP_MD *md2 = NULL;
    size_t size2 = 0;
    unsigned char v1[SHA1_LEN], v2[MAX_MD];

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
    if (v1_len != SHA1_LEN || (t1_len != 0 && t1_len != SHA1_LEN)) {
        PyErr_SetString(PyExc_ValueError, "v1 (and t1 unless empty) must be 20 bytes");
        goto done;
    }
    memcpy(v1, v1_in, SHA1_LEN);
    if (bank2_obj != Py_None) {
        const char *name = PyUnicode_Check(bank2_obj) ? PyUnicode_AsUTF8(bank2_obj) : NULL;
        if (name == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "bank2 must be a bank name or None");
            goto done;
        }
        md2 = bank_md(name, &size2);
        if (md2 == NULL) {
            PyErr_Format(PyExc_ValueError, "unsupported second bank %R", bank2_obj);
            goto done;
        }
        if ((size_t)v2_len != size2 || (t2_len != 0 && (size_t)t2_len != size2)) {
            PyErr_Format(PyExc_ValueError, "v2 (and t2 unless empty) must be %zu bytes", size2);
            goto done;
        }
        memcpy(v2, v2_in, size2);
    }

    const unsigned char *b = (const unsigned char *)buf.buf;
    const Py_ssize_t size = buf.len;
    /* pcr, template hash, tag, u32 data length: at most 24 + 259 + 4 bytes, no overflow */
    const Py_ssize_t hlen = 24 + tag_len + 4;
    const unsigned char zeros[MAX_MD] = {0};
    Py_ssize_t count = 0;
    int hit = 0, failed = 0;
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
            failed = 1;
            break;
        }
        if (memcmp(d, rec + 4, SHA1_LEN) != 0) /* a mismatch, or a violation: the general path */
            break;
        pos = start + (Py_ssize_t)dlen;
        count++;
        if (!extend(ctx, md_sha1, v1, SHA1_LEN, d, SHA1_LEN, NULL, 0)) {
            failed = 1;
            break;
        }
        if (md2 != NULL) {
            int ok = per_bank ? digest(ctx, md2, data, dlen, h) &&
                                    extend(ctx, md2, v2, size2, h, size2, NULL, 0)
                              : extend(ctx, md2, v2, size2, d, SHA1_LEN, zeros, size2 - SHA1_LEN);
            if (!ok) {
                failed = 1;
                break;
            }
            if (t2_len && memcmp(v2, t2, size2) == 0) {
                hit = 1;
                break;
            }
        }
        if (t1_len && memcmp(v1, t1, SHA1_LEN) == 0) {
            hit = 1;
            break;
        }
    }
    Py_END_ALLOW_THREADS

    EVP_MD_CTX_free(ctx);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
        goto done;
    }
    result = Py_BuildValue("(nny#y#O)", pos, count, (const char *)v1, (Py_ssize_t)SHA1_LEN,
                           md2 != NULL ? (const char *)v2 : v2_in, md2 != NULL ? (Py_ssize_t)size2 : v2_len,
                           hit ? Py_True : Py_False);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"hot_binary", hot_binary, METH_VARARGS, hot_binary_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_imafast", "The binary IMA replay's hot loop (see tmb/attest/pcr.py).", -1,
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
