//! Time of one f32 forward pass through an 8-block flow at the shipped bundle's size
//! (d = 1470, subnet width 10), with the scalar kernel and with the kernel the dispatcher
//! picks for this CPU, measured in the same run so that their ratio is meaningful on any
//! machine.
//!
//! Run with `cargo bench --bench flow_kernel`. Set `DAAIN_FLOW_KERNEL=scalar` to make the
//! dispatched kernel the scalar one.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use daain::flow::{block_forward, forward_kernel_f32, BlockParams, Flow};

const DIM: usize = 1470;
const HIDDEN: usize = 10;
const BLOCKS: usize = 8;
const CLAMP: f32 = 2.0;

struct OwnedBlock {
    permutation: Vec<u32>,
    global_scale: Vec<f32>,
    global_offset: Vec<f32>,
    subnet_0_weight: Vec<f32>,
    subnet_0_bias: Vec<f32>,
    subnet_2_weight: Vec<f32>,
    subnet_2_bias: Vec<f32>,
}

impl OwnedBlock {
    fn random(rng: &mut ChaCha8Rng) -> Self {
        let d1 = DIM - DIM / 2;
        let d2 = DIM / 2;
        let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| rng.gen_range(-scale..=scale)).collect()
        };
        let global_scale = uniform(DIM, 1.0);
        let global_offset = uniform(DIM, 0.1);
        let subnet_0_weight = uniform(HIDDEN * d1, 0.05);
        let subnet_0_bias = uniform(HIDDEN, 0.05);
        let subnet_2_weight = uniform(2 * d2 * HIDDEN, 0.3);
        let subnet_2_bias = uniform(2 * d2, 0.3);
        let mut permutation: Vec<u32> = (0..DIM as u32).collect();
        permutation.shuffle(rng);
        Self {
            permutation,
            global_scale,
            global_offset,
            subnet_0_weight,
            subnet_0_bias,
            subnet_2_weight,
            subnet_2_bias,
        }
    }

    fn params(&self) -> BlockParams<'_> {
        BlockParams {
            permutation: &self.permutation,
            global_scale: &self.global_scale,
            global_offset: &self.global_offset,
            subnet_0_weight: &self.subnet_0_weight,
            subnet_0_bias: &self.subnet_0_bias,
            subnet_2_weight: &self.subnet_2_weight,
            subnet_2_bias: &self.subnet_2_bias,
        }
    }
}

fn kernels(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2021);
    let blocks: Vec<OwnedBlock> = (0..BLOCKS).map(|_| OwnedBlock::random(&mut rng)).collect();
    let flow = Flow::new(
        DIM,
        HIDDEN,
        CLAMP,
        blocks.iter().map(OwnedBlock::params).collect(),
    )
    .expect("random flow is valid");
    let x: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-3.0..=3.0)).collect();
    let mut z = vec![0.0f32; DIM];
    let mut scratch = flow.scratch();
    let dispatched = forward_kernel_f32();

    let mut group = c.benchmark_group(format!("flow_forward_f32_d{DIM}_h{HIDDEN}_{BLOCKS}_blocks"));
    group.bench_function("scalar", |b| {
        b.iter(|| {
            flow.forward_with(block_forward::<f32>, black_box(&x), &mut z, &mut scratch)
                .unwrap()
        })
    });
    group.bench_function(format!("dispatched_{}", dispatched.name()), |b| {
        b.iter(|| {
            flow.forward_with(dispatched.kernel(), black_box(&x), &mut z, &mut scratch)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
