// libFuzzer target (make fuzz): any bytes as a checkpoint file. A file that parses must then
// run forward passes that read only inside it, which AddressSanitizer checks.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "transformer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Transformer t;
    char err[ERR_LEN];
    memset(&t, 0, sizeof(t));
    if (checkpoint_parse(&t.ckpt, data, size, "fuzz", err) != 0) return 0;
    const Config *p = &t.ckpt.config;
    // a valid header may still ask for a huge KV cache (seq_len is not in the file size)
    size_t cache = (size_t)p->n_layers * p->seq_len * p->dim + (size_t)p->n_heads * p->seq_len;
    if (cache <= (1 << 22) && transformer_init(&t, "fuzz", KV_F32, err) == 0) {
        transformer_forward(&t, 0, 0);
        transformer_forward(&t, p->vocab_size - 1, p->seq_len > 1 ? 1 : 0);
    }
    transformer_close(&t); // frees the run state; nothing is mapped
    return 0;
}
