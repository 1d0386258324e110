mod common;
use candle_core::{DType, Device, Result};
use foveal_candle::images::synthetic_images;
use foveal_candle::*;
use common::system_and_questions;

#[test]
fn smoke() -> Result<()> {
    let cfg = ModelConfig::visor();
    let t = std::time::Instant::now();
    let model = LlavaModel::seeded(&cfg, 11, &Device::Cpu, DType::F32)?;
    let vcfg = VisorConfig::for_model(&cfg);
    let visor = Visor::seeded(&cfg, &vcfg, 3, &Device::Cpu, DType::F32)?;
    let (system, questions) = system_and_questions();
    let (pixels, _) = synthetic_images(2, 64, 5, &Device::Cpu)?;
    let input = VisorInput { pixels, grid: (1,1), system, questions: questions.iter().map(|q| vec![q.clone()]).collect() };
    eprintln!("build {:?}", t.elapsed());
    let run = visor.generate(&model, &input, 5)?;
    eprintln!("{:?} {:?} {:?} {:?} {:?}", run.configuration, run.predictions, run.generation.tokens, run.prefill, run.decode);
    eprintln!("{:?}", run.router_logits);
    let r = visor.report(run);
    eprintln!("{:?}", r.detail);
    Ok(())
}
