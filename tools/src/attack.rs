//! Adversarial attacks on ESPNet through libtorch autograd: FGSM (Goodfellow et al., 2015)
//! and iterative FGSM (Kurakin et al., 2017), untargeted or towards one class at every
//! pixel.
//!
//! Attacks work in pixel space on the network-sized frame (512x256 RGB, values 0..=255):
//! the gradient flows back through the BGR normalisation of the input convention, the
//! perturbation is bounded in the L-infinity norm in pixel units, and the result is
//! rounded to `u8`. The attacked frame is therefore a real image that the runtime scores
//! like any other frame, and its preprocessing resize is the identity.

use std::fmt;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use daain::preprocess::{ChannelOrder, InputConvention, Preprocessor};
use daain::source::Frame;

use crate::espnet::{Espnet, CLASS_NAMES, NUM_CLASSES};

/// Gradient-sign method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackMethod {
    /// One step of size epsilon along the sign of the gradient.
    Fgsm,
    /// `steps` steps of `step_size`, each projected back into the epsilon ball.
    IterativeFgsm,
}

/// One attack: method, budget and goal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSpec {
    pub method: AttackMethod,
    /// L-infinity budget in pixel units (0..255 scale).
    pub epsilon: f32,
    /// Cityscapes train id that every pixel is pushed towards (11 is person, 0 is road).
    /// Without it the attack is untargeted: it pushes every pixel away from the class
    /// the network predicts on the clean frame.
    #[serde(default)]
    pub target: Option<u8>,
    /// Steps of iterative FGSM; FGSM always takes one.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Step size of iterative FGSM in pixel units; defaults to `epsilon / 4`.
    #[serde(default)]
    pub step_size: Option<f32>,
}

fn default_steps() -> usize {
    10
}

impl AttackSpec {
    /// Checks the budget, the target class and the step settings.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 255.0,
            "invalid attack epsilon {}: expected pixel units in (0, 255]",
            self.epsilon
        );
        if let Some(target) = self.target {
            ensure!(
                usize::from(target) < NUM_CLASSES,
                "invalid attack target {target}: expected a Cityscapes train id 0..{}",
                NUM_CLASSES - 1
            );
        }
        if self.method == AttackMethod::IterativeFgsm {
            ensure!(self.steps > 0, "iterative FGSM needs at least 1 step, got 0");
            let step = self.step_size();
            ensure!(
                step.is_finite() && step > 0.0,
                "invalid attack step_size {step}: expected a positive number of pixel units"
            );
        }
        Ok(())
    }

    /// Returns the number of gradient steps the attack takes.
    pub fn step_count(&self) -> usize {
        match self.method {
            AttackMethod::Fgsm => 1,
            AttackMethod::IterativeFgsm => self.steps,
        }
    }

    /// Returns the size of one step in pixel units.
    pub fn step_size(&self) -> f32 {
        match self.method {
            AttackMethod::Fgsm => self.epsilon,
            AttackMethod::IterativeFgsm => self.step_size.unwrap_or(self.epsilon / 4.0),
        }
    }

    /// Returns a short name such as `ifgsm10-eps8-person`.
    pub fn name(&self) -> String {
        let method = match self.method {
            AttackMethod::Fgsm => "fgsm".to_owned(),
            AttackMethod::IterativeFgsm => format!("ifgsm{}", self.steps),
        };
        let goal = match self.target {
            None => "untargeted".to_owned(),
            Some(target) => CLASS_NAMES[usize::from(target)].replace(' ', "-"),
        };
        format!("{method}-eps{}-{goal}", self.epsilon)
    }
}

impl fmt::Display for AttackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Resizes a frame to the network input size as the runtime's preprocessing does
/// (bilinear at OpenCV's sampling positions) and rounds the result to `u8`.
pub fn resize_to_network(frame: &Frame, convention: &InputConvention) -> Result<Frame> {
    let identity = InputConvention {
        channel_order: ChannelOrder::Rgb,
        mean: [0.0; 3],
        std: [1.0; 3],
        scale: 1.0,
        ..convention.clone()
    };
    let mut planes = vec![0.0f32; identity.tensor_len()];
    Preprocessor::new(identity)
        .run(&frame.data, frame.width, frame.height, &mut planes)
        .with_context(|| format!("failed to resize frame {}", frame.index))?;
    let (height, width) = (convention.height, convention.width);
    let plane = height * width;
    let mut out = Frame {
        index: frame.index,
        timestamp: frame.timestamp,
        ..Frame::default()
    };
    out.resize(width, height);
    for pixel in 0..plane {
        for channel in 0..3 {
            out.data[pixel * 3 + channel] = planes[channel * plane + pixel].round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

/// Converts a packed RGB24 frame into a `[1, 3, H, W]` float tensor of pixel values
/// (0..=255) in RGB order.
pub fn pixels_to_tensor(frame: &Frame) -> Tensor {
    Tensor::from_slice(&frame.data)
        .view([frame.height as i64, frame.width as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
}

/// Applies the input convention to RGB pixel values `[N, 3, H, W]`: channel order, then
/// `(pixel - mean) * scale / std`, as `daain::preprocess::Preprocessor` does. The result
/// is differentiable with respect to `pixels`.
pub fn normalise(pixels: &Tensor, convention: &InputConvention) -> Tensor {
    let ordered = match convention.channel_order {
        ChannelOrder::Rgb => pixels.shallow_clone(),
        ChannelOrder::Bgr => pixels.flip([1]),
    };
    let mean = Tensor::from_slice(&convention.mean).view([1, 3, 1, 1]);
    let factor: Vec<f32> = convention.std.iter().map(|std| convention.scale / std).collect();
    let factor = Tensor::from_slice(&factor).view([1, 3, 1, 1]);
    (ordered - mean) * factor
}

/// Returns the per-pixel classes (`[1, H, W]`, int64) that ESPNet predicts for the frame.
pub fn predict_classes(model: &Espnet, frame: &Frame, convention: &InputConvention) -> Result<Tensor> {
    let input = normalise(&pixels_to_tensor(frame), convention);
    let logits = tch::no_grad(|| model.forward(&input))?;
    Ok(logits.argmax(1, false))
}

/// An attacked frame and what the attack did to its pixels.
#[derive(Debug, Clone)]
pub struct AttackOutcome {
    /// The attacked frame, same size as the input, rounded to `u8`.
    pub frame: Frame,
    /// Largest absolute change of any channel value, in pixel units.
    pub max_abs_change: u8,
    /// Mean absolute change over all channel values, in pixel units.
    pub mean_abs_change: f64,
}

/// Attacks a frame that already has the network input size (see [`resize_to_network`]).
///
/// The loss is the mean per-pixel cross-entropy of the logits: against the clean
/// prediction, ascended, for an untargeted attack, and against the target class,
/// descended, for a targeted one. After the last step the pixels are rounded and kept
/// within `floor(epsilon)` of the input, so the `u8` result never exceeds the budget.
pub fn attack(
    model: &Espnet,
    frame: &Frame,
    spec: &AttackSpec,
    convention: &InputConvention,
) -> Result<AttackOutcome> {
    spec.validate()?;
    ensure!(
        frame.width == convention.width && frame.height == convention.height,
        "attack input is {}x{}, expected the network size {}x{}; resize it with resize_to_network",
        frame.width,
        frame.height,
        convention.width,
        convention.height
    );
    let clean = pixels_to_tensor(frame);
    let labels = match spec.target {
        None => predict_classes(model, frame, convention)?,
        Some(target) => Tensor::full(
            [1, frame.height as i64, frame.width as i64],
            i64::from(target),
            (Kind::Int64, clean.device()),
        ),
    };
    // Untargeted attacks climb the loss of the clean labels, targeted ones descend the
    // loss of the target labels.
    let direction = if spec.target.is_none() { 1.0 } else { -1.0 };
    let epsilon = f64::from(spec.epsilon);
    let step_size = f64::from(spec.step_size());
    let lower = (&clean - epsilon).clamp_min(0.0);
    let upper = (&clean + epsilon).clamp_max(255.0);

    let mut adversarial = clean.copy();
    for _ in 0..spec.step_count() {
        let pixels = adversarial.detach().set_requires_grad(true);
        let logits = model.forward(&normalise(&pixels, convention))?;
        let loss = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
        let gradient = Tensor::run_backward(&[&loss], &[&pixels], false, false)
            .pop()
            .context("autograd returned no gradient for the input pixels")?;
        adversarial = tch::no_grad(|| {
            let stepped = pixels.detach() + gradient.sign() * (direction * step_size);
            stepped.max_other(&lower).min_other(&upper)
        });
    }

    // Rounding can move a value by half a unit past a non-integer budget; clamping to the
    // integer budget afterwards keeps every change within epsilon.
    let budget = epsilon.floor();
    let rounded = adversarial
        .round()
        .max_other(&(&clean - budget).clamp_min(0.0))
        .min_other(&(&clean + budget).clamp_max(255.0));
    let change = (&rounded - &clean).abs();
    let max_abs_change = change.max().double_value(&[]) as u8;
    let mean_abs_change = change.mean(Kind::Double).double_value(&[]);
    let data: Vec<u8> = Vec::try_from(
        &rounded
            .squeeze_dim(0)
            .permute([1, 2, 0])
            .contiguous()
            .to_kind(Kind::Uint8)
            .flatten(0, -1),
    )?;
    let mut out = frame.clone();
    out.data = data;
    Ok(AttackOutcome {
        frame: out,
        max_abs_change,
        mean_abs_change,
    })
}

/// Returns the fraction of pixels whose class differs between two class maps of equal
/// length.
pub fn changed_fraction(clean: &[u8], attacked: &[u8]) -> Result<f64> {
    ensure!(
        clean.len() == attacked.len() && !clean.is_empty(),
        "class maps have {} and {} pixels; they must be equal and non-empty",
        clean.len(),
        attacked.len()
    );
    let changed = clean.iter().zip(attacked).filter(|(a, b)| a != b).count();
    Ok(changed as f64 / clean.len() as f64)
}

/// Returns the fraction of pixels of class `class` in a class map.
pub fn class_fraction(classes: &[u8], class: u8) -> f64 {
    if classes.is_empty() {
        return 0.0;
    }
    classes.iter().filter(|&&c| c == class).count() as f64 / classes.len() as f64
}
