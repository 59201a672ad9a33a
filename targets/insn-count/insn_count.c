/*
 * QEMU TCG plugin that counts the guest instructions qemu-user executes, per guest
 * thread (vCPU), and writes the counts to a file when the guest exits.
 *
 * Usage: qemu-aarch64 -plugin libinsn_count.so,out=COUNTS ...
 *
 * COUNTS gets one line per thread that ran, "vcpu INDEX INSTRUCTIONS", then
 * "total INSTRUCTIONS". qemu-user numbers threads in the order they start, so vCPU 0 is
 * the main thread.
 *
 * Debian's qemu-user is built with plugin support but ships neither QEMU's plugin header
 * nor its example plugins (such as libinsn.so). This file therefore declares the few
 * functions and types of the plugin API (version 1, QEMU 7.2) that it uses.
 */
#include <inttypes.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_info_t;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };

typedef void (*translation_callback)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*execution_callback)(unsigned int vcpu_index, void *userdata);
typedef void (*exit_callback)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, translation_callback cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, execution_callback cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, exit_callback cb, void *userdata);

#define EXPORT __attribute__((visibility("default")))

/* The plugin API version this plugin was written against. */
EXPORT int qemu_plugin_version = 1;

/* Threads past the last slot are counted in it. */
#define MAX_VCPUS 256

static _Atomic uint64_t executed[MAX_VCPUS];
static char *output_path;

/* Adds the instruction count of a translation block (passed as its userdata) to the
 * executing thread's counter. One thread runs per vCPU, so relaxed ordering suffices. */
static void on_block_executed(unsigned int vcpu_index, void *userdata)
{
    unsigned int slot = vcpu_index < MAX_VCPUS ? vcpu_index : MAX_VCPUS - 1;
    atomic_fetch_add_explicit(&executed[slot], (uint64_t)(uintptr_t)userdata,
                              memory_order_relaxed);
}

static void on_block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t instructions = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block_executed, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)instructions);
}

static void write_counts(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    FILE *out = fopen(output_path, "w");
    if (out == NULL) {
        perror(output_path);
        return;
    }
    uint64_t total = 0;
    for (unsigned int vcpu = 0; vcpu < MAX_VCPUS; vcpu++) {
        uint64_t count = atomic_load(&executed[vcpu]);
        if (count > 0) {
            fprintf(out, "vcpu %u %" PRIu64 "\n", vcpu, count);
        }
        total += count;
    }
    fprintf(out, "total %" PRIu64 "\n", total);
    fclose(out);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t *info, int argc,
                               char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            output_path = strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "insn_count: unknown argument %s; the only one is out=FILE\n",
                    argv[i]);
            return 1;
        }
    }
    if (output_path == NULL) {
        fprintf(stderr, "insn_count: missing argument out=FILE\n");
        return 1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_block_translated);
    qemu_plugin_register_atexit_cb(id, write_counts, NULL);
    return 0;
}
