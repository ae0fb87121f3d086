/* SHA-256 for the hash chain: OpenSSL's libcrypto when the build found it
 * (TAMMA_HAVE_OPENSSL), otherwise the caller falls back to Python's hashlib.
 * Both compute the same standard SHA-256; the libcrypto path only skips the per-call
 * object overhead of hashlib, which costs more than hashing a 300-byte row. */
#ifndef TAMMA_SHA256_H
#define TAMMA_SHA256_H

#include <stddef.h>

#ifdef TAMMA_HAVE_OPENSSL
#include <openssl/evp.h>
#include <openssl/opensslv.h>

static const EVP_MD *tamma_sha256_md = NULL;

static int tamma_sha256_available(void) {
    if (tamma_sha256_md == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        /* An explicit fetch once: EVP_sha256() would fetch again at every init. */
        tamma_sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
        tamma_sha256_md = EVP_sha256();
#endif
    }
    return tamma_sha256_md != NULL;
}

static void *tamma_sha256_ctx_new(void) { return (void *)EVP_MD_CTX_new(); }
static void tamma_sha256_ctx_free(void *ctx) { EVP_MD_CTX_free((EVP_MD_CTX *)ctx); }

/* md = SHA-256(a || b); returns 1 on success. */
static int tamma_sha256_2(void *ctx, const unsigned char *a, size_t na,
                          const unsigned char *b, size_t nb, unsigned char *md) {
    EVP_MD_CTX *c = (EVP_MD_CTX *)ctx;
    return EVP_DigestInit_ex(c, tamma_sha256_md, NULL)
        && EVP_DigestUpdate(c, a, na)
        && EVP_DigestUpdate(c, b, nb)
        && EVP_DigestFinal_ex(c, md, NULL);
}
#else
static int tamma_sha256_available(void) { return 0; }
static void *tamma_sha256_ctx_new(void) { return NULL; }
static void tamma_sha256_ctx_free(void *ctx) { (void)ctx; }
static int tamma_sha256_2(void *ctx, const unsigned char *a, size_t na,
                          const unsigned char *b, size_t nb, unsigned char *md) {
    (void)ctx; (void)a; (void)na; (void)b; (void)nb; (void)md;
    return 0;
}
#endif

#endif
