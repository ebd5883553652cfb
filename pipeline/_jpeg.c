/* tricks.pipeline._jpeg: crop-decode-resize-flip of JPEG batches with libjpeg-turbo.
 *
 * One call makes a whole batch: C threads (the GIL released) take images from a shared counter
 * and, per image, decode only what the crop needs (DCT-domain scaling 1/2, 1/4, 1/8 when the
 * crop is at least 6x the output side, or 2x with ``fast``; see dct_denominator;
 * jpeg_crop_scanline for the columns and
 * jpeg_skip_scanlines for the rows above it; rows below it are never decoded), resample it with
 * a separable filter (box, i.e. area averaging, when shrinking, as Pillow's BOX; bilinear with
 * half-pixel centres and edge repeat when enlarging, as Pillow's BILINEAR) straight into its slot
 * of the caller's N x S x S x 3 batch, flipped when asked: uint8, or float32 already normalized
 * (each channel's rounded uint8 value v written as v * scale + shift, i.e. (v / 255 - mean) / std
 * for the caller's constants). Normalizing here, in the decode threads, costs nothing next to
 * the decode; done afterwards on one thread it was most of the loader's time (a 64 x 224^2
 * batch: ~150 ms in torch's mixed-dtype addcmul, against ~160 ms to decode it).
 *
 * Geometry: a box (x0, y0, x1, y1) is in source pixels; a decode at scale 1/d maps source x to
 * x / d exactly (scaled pixel k covers source [k d, (k + 1) d)), so the box is divided by d and
 * never by a rounded size ratio.
 *
 * Anything libjpeg rejects or warns about (corrupt data, CMYK) is reported back per image, not
 * guessed at: the caller decodes those with Pillow.
 *
 * Integrity: given the records' CRC-32s (zlib's polynomial, as records.py writes them), each
 * decode thread checks its image's bytes before decoding them (the bytes are read once more,
 * from cache: ~45 us for 110 kB against milliseconds of decode) and reports a mismatch as
 * "checksum mismatch", which the caller never hands to Pillow. zlib's crc32 where its header was
 * found at build time (HAVE_ZLIB), else our own table-driven CRC-32 of the same polynomial.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#ifdef HAVE_ZLIB
#include <zlib.h>
#endif

#ifdef HAVE_ZLIB
static uint32_t crc32_of(const unsigned char *data, size_t size) {
    uLong crc = crc32(0L, Z_NULL, 0);
    while (size > 0) { /* zlib takes uInt lengths */
        uInt n = size > 0x40000000u ? 0x40000000u : (uInt)size;
        crc = crc32(crc, data, n);
        data += n;
        size -= n;
    }
    return (uint32_t)crc;
}
#else
/* CRC-32 (reflected polynomial 0xEDB88320, as zlib), four table lookups per 4 bytes */
static uint32_t crc_table[4][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 4; t++)
            crc_table[t][n] = crc_table[0][crc_table[t - 1][n] & 0xFF] ^ (crc_table[t - 1][n] >> 8);
}

static uint32_t crc32_of(const unsigned char *data, size_t size) {
    pthread_once(&crc_once, crc_init);
    uint32_t c = 0xFFFFFFFFu;
    for (; size >= 4; size -= 4, data += 4) {
        c ^= (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 |
             (uint32_t)data[3] << 24;
        c = crc_table[3][c & 0xFF] ^ crc_table[2][(c >> 8) & 0xFF] ^
            crc_table[1][(c >> 16) & 0xFF] ^ crc_table[0][c >> 24];
    }
    while (size--) c = crc_table[0][(c ^ *data++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* A warning (corrupt or truncated data) fails the image: libjpeg would otherwise fill the
 * missing part with grey, and silently wrong pixels are worse than a Pillow fallback. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

/* Resampling weights of one axis: output i reads taps[i * ntaps ..] from first[i]. */
typedef struct {
    int *first;
    int *count;     /* taps used by output i */
    float *weights;
    int ntaps;      /* stride of weights */
    int lo, hi; /* the source range [lo, hi) any output touches */
} Axis;

static void axis_free(Axis *a) {
    free(a->first);
    free(a->count);
    free(a->weights);
    a->first = a->count = NULL;
    a->weights = NULL;
}

/* Weights mapping source [in0, in1) (in pixels of an axis of in_size) onto out_size pixels. */
static int axis_make(Axis *a, double in0, double in1, int in_size, int out_size, int coverage) {
    double scale = (in1 - in0) / out_size;
    int ntaps = scale >= 1.0 ? (int)ceil(scale) + 2 : 2;
    a->ntaps = ntaps;
    a->first = (int *)malloc(sizeof(int) * out_size);
    a->count = (int *)malloc(sizeof(int) * out_size);
    a->weights = (float *)calloc((size_t)out_size * ntaps, sizeof(float));
    if (!a->first || !a->count || !a->weights) return -1;
    a->lo = in_size;
    a->hi = 0;
    for (int i = 0; i < out_size; i++) {
        float *w = a->weights + (size_t)i * ntaps;
        int j0, n = 0;
        if (scale >= 1.0 && coverage) {
            /* area by coverage: each source pixel weighted by its overlap with the output's
             * interval (OpenCV's INTER_AREA) */
            double s = in0 + i * scale, e = s + scale;
            if (s < 0) s = 0;
            if (e > in_size) e = in_size;
            if (e <= s) {
                j0 = s >= in_size ? in_size - 1 : 0;
                w[0] = 1.0f;
                n = 1;
            } else {
                j0 = (int)floor(s);
                double total = 0;
                for (int j = j0; j < e && n < ntaps; j++, n++) {
                    double lo = j > s ? j : s, hi = j + 1 < e ? j + 1 : e;
                    w[n] = (float)(hi - lo);
                    total += hi - lo;
                }
                for (int k = 0; k < n; k++) w[k] = (float)(w[k] / total);
            }
        } else if (scale >= 1.0) {
            /* box (Pillow's BOX, i.e. area averaging): the mean of the source pixels whose
             * centres lie in (centre - scale/2, centre + scale/2] */
            double centre = in0 + (i + 0.5) * scale, half = scale / 2;
            int lo = (int)(centre - half + 0.5), hi = (int)(centre + half + 0.5);
            if (lo < 0) lo = 0;
            if (hi > in_size) hi = in_size;
            j0 = -1;
            for (int j = lo; j < hi && n < ntaps; j++) {
                double x = (j + 0.5 - centre) / scale;
                if (x > -0.5 && x <= 0.5) {
                    if (j0 < 0) j0 = j;
                    n++;
                }
            }
            if (n == 0) { /* a box outside the image: its nearest edge pixel */
                j0 = centre >= in_size ? in_size - 1 : 0;
                n = 1;
            }
            for (int k = 0; k < n; k++) w[k] = 1.0f / n;
        } else { /* bilinear, half-pixel centres, edges repeated */
            double p = in0 + (i + 0.5) * scale - 0.5;
            int j = (int)floor(p);
            double f = p - j;
            if (j < 0) { j = 0; f = 0; }
            if (j >= in_size - 1) { j = in_size - 1; f = 0; }
            j0 = j;
            w[0] = (float)(1 - f);
            w[1] = (float)f;
            n = f > 0 ? 2 : 1;
        }
        a->first[i] = j0;
        a->count[i] = n;
        if (j0 < a->lo) a->lo = j0;
        if (j0 + n > a->hi) a->hi = j0 + n;
    }
    return 0;
}

/* Rounded (c holds value + 0.5, within [0.5, 255.5]), clamped: uint8, or that uint8 value
 * times scale plus shift. Separate functions with restrict pointers, so the loops vectorise. */
static void store_uint8(const float *restrict c, unsigned char *restrict out, int n) {
    for (int x = 0; x < n; x++) {
        int v = (int)c[x]; /* clamped as an int: a float compare here stops vectorisation */
        out[x] = (unsigned char)(v < 255 ? v : 255);
    }
}

static void store_normalized(const float *restrict c, const float *restrict scale,
                             const float *restrict shift, float *restrict out, int n) {
    for (int x = 0; x < n; x++) {
        int v = (int)c[x];
        v = v < 255 ? v : 255;
        out[x] = (float)v * scale[x] + shift[x];
    }
}

typedef float v4sf __attribute__((vector_size(16))); /* GCC/Clang vector extension */

static inline v4sf load4(const float *p) {
    v4sf v;
    memcpy(&v, p, sizeof(v)); /* unaligned */
    return v;
}

typedef struct {
    const unsigned char *data;
    size_t size;
    float box[4];
    int flip;
    int check;      /* compare the bytes' CRC-32 with crc first */
    uint32_t crc;
} Job;

/* The DCT-domain reduction d (1, 2, 4 or 8): the largest that leaves the crop's shorter side at
 * least margin * d * size pixels, so the area filter after it still shrinks by >= margin. An
 * area filter over DCT-reduced pixels cannot split a reduced pixel as the full-resolution one
 * splits source pixels; the error falls as the remaining shrink grows (measured on photographs
 * against PIL's full-resolution box, mean absolute error: margin 1: 2.5-3.6 levels, margin 2:
 * 1.4-1.7, margin 3: 1.2). Exact crops use EXACT_MARGIN; fast ones reduce whenever the crop is
 * at least twice the output side. */
#define EXACT_MARGIN 3

static int dct_denominator(const float *box, int size, int margin) {
    double shrink = fmin(box[2] - box[0], box[3] - box[1]) / size / margin;
    return shrink >= 8 ? 8 : shrink >= 4 ? 4 : shrink >= 2 ? 2 : 1;
}

/* Per channel: out = v * scale + shift of the rounded uint8 value v (normalize), or v itself. */
typedef struct {
    int on;
    float scale[3], shift[3];
} Normalize;

/* Decode job's crop into out (size x size x 3: uint8, or float32 when norm->on). 0 on success,
 * else message is filled. */
static int crop_one(const Job *job, int size, int fast, const Normalize *norm, void *out,
                    char *message) {
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    Axis ax = {0}, ay = {0};
    float *volatile rows = NULL;
    JSAMPLE *volatile line = NULL;

    if (job->check) {
        uint32_t crc = crc32_of(job->data, job->size);
        if (crc != job->crc) {
            snprintf(message, JMSG_LENGTH_MAX, "checksum mismatch (CRC-32 %08x, index says %08x)",
                     crc, job->crc);
            return -1;
        }
    }

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        snprintf(message, JMSG_LENGTH_MAX, "libjpeg: %s", err.message);
        jpeg_destroy_decompress(&cinfo);
        axis_free(&ax);
        axis_free(&ay);
        free(rows);
        free(line);
        return -1;
    }
    jpeg_mem_src(&cinfo, job->data, (unsigned long)job->size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        snprintf(message, JMSG_LENGTH_MAX, "CMYK/YCCK JPEG");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    int d = dct_denominator(job->box, size, fast ? 1 : EXACT_MARGIN);
    cinfo.out_color_space = JCS_RGB; /* grayscale sources too: libjpeg replicates the channel */
    cinfo.scale_num = 1;
    cinfo.scale_denom = d;
    if (fast) {
        cinfo.dct_method = JDCT_IFAST;
        cinfo.do_fancy_upsampling = FALSE;
    }
    jpeg_calc_output_dimensions(&cinfo);
    int width = (int)cinfo.output_width, height = (int)cinfo.output_height;
    /* after a DCT-domain reduction, the remaining (small) shrink weights pixels by coverage:
     * a second coarse box would alias (measured: 35% lower error against a full-size box) */
    int coverage = d > 1;
    if (axis_make(&ax, job->box[0] / d, job->box[2] / d, width, size, coverage) ||
        axis_make(&ay, job->box[1] / d, job->box[3] / d, height, size, coverage)) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        axis_free(&ax);
        axis_free(&ay);
        return -1;
    }
    jpeg_start_decompress(&cinfo);
    JDIMENSION xoff = (JDIMENSION)ax.lo, cw = (JDIMENSION)(ax.hi - ax.lo);
    if (cw < (JDIMENSION)width) jpeg_crop_scanline(&cinfo, &xoff, &cw); /* widens to iMCUs */
    const int nrows = ay.hi - ay.lo, stride = (int)cw * 3;
    /* the crop's decoded rows (uint8), then one float row for the vertical pass */
    line = (JSAMPLE *)malloc((size_t)nrows * stride);
    /* + zeros after the row, which the horizontal pass may read under zero weights, + a
     * gathered output row, and the normalize constants repeated along a row */
    const size_t pad = 3 * (size_t)ax.ntaps + 4;
    rows = (float *)malloc(sizeof(float) * ((size_t)stride + pad + 9 * (size_t)size));
    if (!rows || !line) {
        strcpy(err.message, "out of memory");
        longjmp(err.jump, 1);
    }
    if (ay.lo > 0) {
        JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, (JDIMENSION)ay.lo);
        if (skipped != (JDIMENSION)ay.lo) {
            strcpy(err.message, "could not skip to the crop");
            longjmp(err.jump, 1);
        }
    }
    JSAMPROW pointers[16];
    for (int r = 0; r < nrows;) {
        int want = nrows - r < 16 ? nrows - r : 16;
        for (int k = 0; k < want; k++) pointers[k] = line + (size_t)(r + k) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, pointers, (JDIMENSION)want);
        if (got == 0) {
            strcpy(err.message, "short read");
            longjmp(err.jump, 1);
        }
        r += (int)got;
    }
    /* the rows below the crop are never decoded */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    /* vertical pass first (contiguous, vectorised), then the horizontal one on size rows only:
     * the gathering (scalar) pass runs on the smaller image when shrinking */
    float *acc = rows, *gathered = rows + stride + pad, *scale_row = gathered + 3 * size,
          *shift_row = scale_row + 3 * size;
    memset(acc + stride, 0, sizeof(float) * pad);
    if (norm->on)
        for (int x = 0; x < 3 * size; x++) {
            scale_row[x] = norm->scale[x % 3];
            shift_row[x] = norm->shift[x % 3];
        }
    const int *fx = ax.first, *cx = ax.count;
    const float *wx = ax.weights;
    const int nx = ax.ntaps, shift = (int)xoff;
    for (int i = 0; i < size; i++) {
        const float *w = ay.weights + (size_t)i * ay.ntaps;
        const JSAMPLE *src = line + (size_t)(ay.first[i] - ay.lo) * stride;
        const int taps = ay.count[i];
        for (int x = 0; x < stride; x++) acc[x] = w[0] * src[x];
        for (int k = 1; k < taps; k++) {
            const JSAMPLE *sk = src + (size_t)k * stride;
            const float wk = w[k];
            for (int x = 0; x < stride; x++) acc[x] += wk * sk[x];
        }
        /* gather (flipped here), then round, clamp and store a whole row in a loop the
         * compiler vectorises. One pixel's 3 channels ride in a 4-lane vector (the 4th lane
         * reads the next pixel, or the zeros after the row, and is dropped). */
        for (int j = 0; j < size; j++) {
            const float *wj = wx + (size_t)j * nx;
            const float *a3 = acc + (size_t)(fx[j] - shift) * 3;
            v4sf c = {0.5f, 0.5f, 0.5f, 0.5f};
            for (int k = 0, taps2 = cx[j]; k < taps2; k++) c += wj[k] * load4(a3 + 3 * k);
            const float c0 = c[0], c1 = c[1], c2 = c[2];
            float *t = gathered + 3 * (job->flip ? size - 1 - j : j);
            t[0] = c0;
            t[1] = c1;
            t[2] = c2;
        }
        /* weights are >= 0 and sum to 1: c stays within [0.5, 255.5] up to rounding, so
         * truncation after the +0.5 rounds; the normalized value is that of the rounded uint8
         * value, so both outputs agree exactly */
        const int n3 = size * 3;
        if (norm->on)
            store_normalized(gathered, scale_row, shift_row, (float *)out + (size_t)i * n3, n3);
        else
            store_uint8(gathered, (unsigned char *)out + (size_t)i * n3, n3);
    }
    axis_free(&ax);
    axis_free(&ay);
    free(rows);
    free(line);
    return 0;
}

typedef struct {
    const Job *jobs;
    Py_ssize_t count;
    int size, fast;
    Normalize norm;
    unsigned char *out;       /* slot k starts at out + k * slot bytes */
    Py_ssize_t next;          /* atomic work counter */
    char (*messages)[JMSG_LENGTH_MAX];
    int *failed;
} Batch;

static void *worker(void *arg) {
    Batch *b = (Batch *)arg;
    size_t slot = (size_t)b->size * b->size * 3 * (b->norm.on ? sizeof(float) : 1);
    for (;;) {
        Py_ssize_t k = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (k >= b->count) return NULL;
        b->failed[k] = crop_one(&b->jobs[k], b->size, b->fast, &b->norm, b->out + slot * k,
                                b->messages[k]) != 0;
    }
}

PyDoc_STRVAR(decode_crops_doc,
"decode_crops(jpegs, boxes, flips, out, threads=1, fast=False, normalize=None, crcs=None)\n"
"    -> list[(int, str)]\n\n"
"Decode, crop, resize and flip a batch into ``out`` (writable, C-contiguous uint8,\n"
"N x S x S x 3, HWC RGB; float32 with ``normalize``). ``normalize``: 6 floats (scale r, g, b,\n"
"shift r, g, b): each rounded uint8 value v is written as v * scale + shift.\n"
"``jpegs``: N objects with the buffer protocol (the JPEG bytes);\n"
"``boxes``: float32 N x 4 (x0, y0, x1, y1 in source pixels); ``flips``: N bytes (0/1).\n"
"``threads``: decode threads (the GIL is released). ``fast``: DCT-domain reduction whenever\n"
"the crop is at least twice the output side (else 6x), libjpeg's fast integer IDCT\n"
"and plain (not fancy) chroma upsampling. ``crcs``: uint32 N (little-endian), each image's\n"
"expected CRC-32 (zlib's), checked by the decode threads first (reason \"checksum mismatch\").\n"
"Returns the (index, reason) of each image that could not be decoded; their slots are left\n"
"unspecified.");

static PyObject *decode_crops(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"jpegs", "boxes", "flips", "out", "threads", "fast", "normalize",
                             "crcs", NULL};
    PyObject *jpegs, *result = NULL, *normalize = Py_None, *out_obj, *crcs_obj = Py_None;
    Py_buffer boxes = {0}, flips = {0}, out = {0}, crcs = {0};
    int threads = 1, fast = 0;
    Normalize norm = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oy*y*O|ipOO", kwlist, &jpegs, &boxes, &flips,
                                     &out_obj, &threads, &fast, &normalize, &crcs_obj))
        return NULL;
    /* shape and item format, not only a byte count: a uint8 buffer can have as many bytes as
     * a smaller float32 one */
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) <
        0) {
        PyBuffer_Release(&boxes);
        PyBuffer_Release(&flips);
        return NULL;
    }
    if (normalize != Py_None) {
        PyObject *values = PySequence_Fast(normalize, "normalize must be 6 floats");
        if (!values || PySequence_Fast_GET_SIZE(values) != 6) {
            if (values) PyErr_SetString(PyExc_ValueError, "normalize must be 6 floats");
            Py_XDECREF(values);
            PyBuffer_Release(&boxes);
            PyBuffer_Release(&flips);
            PyBuffer_Release(&out);
            return NULL;
        }
        for (int c = 0; c < 6; c++) {
            double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(values, c));
            if (c < 3) norm.scale[c] = (float)v;
            else norm.shift[c - 3] = (float)v;
        }
        Py_DECREF(values);
        if (PyErr_Occurred()) {
            PyBuffer_Release(&boxes);
            PyBuffer_Release(&flips);
            PyBuffer_Release(&out);
            return NULL;
        }
        norm.on = 1;
    }
    if (crcs_obj != Py_None && PyObject_GetBuffer(crcs_obj, &crcs, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&boxes);
        PyBuffer_Release(&flips);
        PyBuffer_Release(&out);
        return NULL;
    }
    const Py_ssize_t itemsize = norm.on ? (Py_ssize_t)sizeof(float) : 1;
    PyObject *seq = PySequence_Fast(jpegs, "jpegs must be a sequence of buffers");
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq) : 0;
    Py_buffer *views = n ? (Py_buffer *)calloc((size_t)n, sizeof(Py_buffer)) : NULL;
    Job *jobs = n ? (Job *)calloc((size_t)n, sizeof(Job)) : NULL;
    char (*messages)[JMSG_LENGTH_MAX] = n ? calloc((size_t)n, JMSG_LENGTH_MAX) : NULL;
    int *failed = n ? (int *)calloc((size_t)n, sizeof(int)) : NULL;
    Py_ssize_t held = 0;
    if (!seq) goto done;
    if (n && (!views || !jobs || !messages || !failed)) {
        PyErr_NoMemory();
        goto done;
    }
    if (boxes.len != n * 4 * (Py_ssize_t)sizeof(float) || flips.len != n) {
        PyErr_Format(PyExc_ValueError, "boxes must be float32 %zd x 4 and flips %zd bytes", n, n);
        goto done;
    }
    if (crcs.buf && crcs.len != n * (Py_ssize_t)sizeof(uint32_t)) {
        PyErr_Format(PyExc_ValueError, "crcs must be uint32 %zd", n);
        goto done;
    }
    if (n == 0) {
        result = PyList_New(0);
        goto done;
    }
    const char *format = out.format ? out.format : "B";
    if (*format == '<' || *format == '=' || *format == '@') format++;
    int size = out.ndim == 4 ? (int)out.shape[1] : 0;
    if (out.ndim != 4 || out.shape[0] != n || out.shape[2] != size || out.shape[3] != 3 ||
        size <= 0 || out.itemsize != itemsize || strcmp(format, norm.on ? "f" : "B") != 0 ||
        ((uintptr_t)out.buf % (uintptr_t)itemsize) != 0) {
        PyErr_Format(PyExc_ValueError, "out must be a C-contiguous %s %zd x S x S x 3 array",
                     norm.on ? "float32" : "uint8", n);
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++, held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &views[k], PyBUF_SIMPLE) < 0)
            goto done;
        jobs[k].data = (const unsigned char *)views[k].buf;
        jobs[k].size = (size_t)views[k].len;
        memcpy(jobs[k].box, (const float *)boxes.buf + 4 * k, sizeof(jobs[k].box));
        jobs[k].flip = ((const unsigned char *)flips.buf)[k] != 0;
        if (crcs.buf) {
            const unsigned char *c = (const unsigned char *)crcs.buf + 4 * k;
            jobs[k].check = 1;
            jobs[k].crc = (uint32_t)c[0] | (uint32_t)c[1] << 8 | (uint32_t)c[2] << 16 |
                          (uint32_t)c[3] << 24;
        }
    }
    Batch batch = {jobs, n, size, fast, norm, (unsigned char *)out.buf, 0, messages, failed};
    if (threads < 1) threads = 1;
    if (threads > n) threads = (int)n;
    Py_BEGIN_ALLOW_THREADS
    pthread_t *ids = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)threads);
    int started = 0;
    for (int t = 1; ids && t < threads; t++, started++)
        if (pthread_create(&ids[t], NULL, worker, &batch) != 0) break;
    worker(&batch); /* this thread works too */
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    free(ids);
    Py_END_ALLOW_THREADS
    result = PyList_New(0);
    for (Py_ssize_t k = 0; result && k < n; k++) {
        if (!failed[k]) continue;
        PyObject *item = Py_BuildValue("(ns)", k, messages[k]);
        if (!item || PyList_Append(result, item) < 0) Py_CLEAR(result);
        Py_XDECREF(item);
    }
done:
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    free(views);
    free(jobs);
    free(messages);
    free(failed);
    Py_XDECREF(seq);
    PyBuffer_Release(&boxes);
    PyBuffer_Release(&flips);
    PyBuffer_Release(&out);
    if (crcs.buf) PyBuffer_Release(&crcs);
    return result;
}

PyDoc_STRVAR(crc32_doc,
"crc32(data) -> int\n\n"
"The CRC-32 the decode threads compute (zlib's, or ours without zlib; equal to zlib.crc32).");

static PyObject *crc32_py(PyObject *self, PyObject *args) {
    Py_buffer data = {0};
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
    crc = crc32_of((const unsigned char *)data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(decode_doc,
"decode(jpeg, scale_denom=1) -> (height, width, bytes)\n\n"
"A plain full decode to RGB (accurate IDCT, fancy upsampling) at scale 1/scale_denom: the\n"
"reference and the benchmark's decode ceiling. Raises ValueError on a corrupt JPEG.");

static PyObject *decode(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"jpeg", "scale_denom", NULL};
    Py_buffer src = {0};
    int denom = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|i", kwlist, &src, &denom)) return NULL;
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    unsigned char *volatile pixels = NULL;
    int ok = 0, h = 0, w = 0;
    Py_BEGIN_ALLOW_THREADS
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    jpeg_create_decompress(&cinfo);
    if (!setjmp(err.jump)) {
        jpeg_mem_src(&cinfo, (const unsigned char *)src.buf, (unsigned long)src.len);
        jpeg_read_header(&cinfo, TRUE);
        cinfo.out_color_space = JCS_RGB;
        cinfo.scale_num = 1;
        cinfo.scale_denom = denom;
        jpeg_start_decompress(&cinfo);
        h = (int)cinfo.output_height;
        w = (int)cinfo.output_width;
        pixels = (unsigned char *)malloc((size_t)h * w * 3);
        if (pixels) {
            while (cinfo.output_scanline < cinfo.output_height) {
                JSAMPROW row = pixels + (size_t)cinfo.output_scanline * w * 3;
                jpeg_read_scanlines(&cinfo, &row, 1);
            }
            jpeg_finish_decompress(&cinfo);
            ok = 1;
        }
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (!ok) {
        free(pixels);
        if (!pixels && h) return PyErr_NoMemory();
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)pixels, (Py_ssize_t)h * w * 3);
    free(pixels);
    if (!bytes) return NULL;
    return Py_BuildValue("(iiN)", h, w, bytes);
}

static PyMethodDef methods[] = {
    {"decode_crops", (PyCFunction)(void (*)(void))decode_crops, METH_VARARGS | METH_KEYWORDS,
     decode_crops_doc},
    {"decode", (PyCFunction)(void (*)(void))decode, METH_VARARGS | METH_KEYWORDS, decode_doc},
    {"crc32", crc32_py, METH_VARARGS, crc32_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg",
    "Batched crop-decode-resize-flip of JPEGs with libjpeg-turbo (the native engine's CPU path).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__jpeg(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION);
#ifdef HAVE_ZLIB
    if (m) PyModule_AddIntConstant(m, "CRC_ZLIB", 1);
#else
    if (m) PyModule_AddIntConstant(m, "CRC_ZLIB", 0);
#endif
    return m;
}
