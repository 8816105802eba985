//! The end-to-end tests, one module per area, in one test binary: each binary links the whole
//! stack, and some two dozen of them took minutes to link and gigabytes of disk.

mod engine_dialect;
mod engine_tokenizer;
mod exhaustion;
mod fuzz_memory;
mod fuzz_runtime;
mod import_graph;
mod memory_abandoned;
mod memory_disk_full;
mod memory_durable;
mod memory_events;
mod memory_frozen_disk;
mod memory_reclaim;
mod memory_rpcs;
mod memory_shutdown;
mod memory_stress;
mod memory_time;
mod metrics;
mod metrics_vllm;
mod runtime_cancel;
mod runtime_crash;
mod runtime_device;
mod runtime_device_memory;
mod runtime_fence;
mod runtime_generate;
mod runtime_kill;
mod runtime_lifecycle;
mod runtime_memory_restart;
mod runtime_prefix_cache;
mod runtime_same_device;
mod security_memory;
mod security_runtime;
mod tracing;
mod transport_limits;
