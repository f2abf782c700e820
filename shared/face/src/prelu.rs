//! ONNX `PRelu` in one pass over the tensor, in place.
//!
//! tract-onnx expands `PRelu` into three element-wise operations (a multiply by the slopes, a
//! comparison with zero, a select), each a broadcasting `ndarray` loop that allocates its
//! result. SFace holds 27 of them and each MiniFASNet 33. Here the expansion wires one binary
//! operation instead, `y = x < 0 ? x * slope : x`, which runs in place on its input. It is
//! registered in place of tract's for the face models only ([`onnx`]).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_hir::internal::*;

/// tract's ONNX parser with `PRelu` wired as one operation.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert("PRelu", |_, _| Ok((expand(FusedPrelu), vec![])));
    onnx
}

/// The ONNX operation: the input and its slopes, broadcast (ONNX's unidirectional
/// broadcasting: the slopes' shape aligns with the input's last axes).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct FusedPrelu;

impl Expansion for FusedPrelu {
    fn name(&self) -> StaticName {
        "FusedPrelu".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        name: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = inputs[0];
        let mut slopes = inputs[1];
        let rank = model.outlet_fact(x)?.rank();
        while model.outlet_fact(slopes)?.rank() < rank {
            slopes = model.wire_node(
                format!("{name}.add-axis-{}", model.outlet_fact(slopes)?.rank()),
                AxisOp::Add(0),
                &[slopes],
            )?[0];
        }
        model.wire_node(name, TypedBinOp(Box::new(PreluOp), None), &[x, slopes])
    }
}

/// `a < 0 ? a * b : a`, element by element, `b` broadcast to `a`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct PreluOp;

impl PreluOp {
    /// In place on `a`, whose shape is the broadcast one.
    fn apply(a: &mut Tensor, b: &Tensor) -> TractResult<()> {
        ensure!(
            a.datum_type() == f32::datum_type() && b.datum_type() == f32::datum_type(),
            "PRelu on {:?} and {:?}: only f32",
            a.datum_type(),
            b.datum_type()
        );
        let b = b.to_plain_array_view::<f32>()?;
        let mut a = a.to_plain_array_view_mut::<f32>()?;
        // The usual case: one slope per channel on a contiguous tensor. The slopes are 1 along
        // every axis but one, the channel's (axis 1 of `[N, C, H, W]`, or axis 0 once tract has
        // dropped a batch of one), or a single slope: each channel's plane is one run with one
        // slope. The loop body is a select, not a branch, so the compiler vectorises it.
        let shape = a.shape().to_vec();
        let wide: TVec<usize> = (0..b.ndim()).filter(|&axis| b.shape()[axis] != 1).collect();
        // (the length of a run with one slope, the slopes in turn)
        let runs = match wide.as_slice() {
            _ if b.ndim() != shape.len() => None,
            [] => Some((shape.iter().product::<usize>(), 1)),
            &[axis] if b.shape()[axis] == shape[axis] => {
                Some((shape[axis + 1..].iter().product::<usize>(), shape[axis]))
            }
            _ => None,
        };
        if let (Some((run, cycle)), Some(values), Some(slopes)) =
            (runs, a.as_slice_mut(), b.as_slice())
        {
            for (i, x) in values.chunks_exact_mut(run.max(1)).enumerate() {
                let slope = slopes[i % cycle];
                for v in x {
                    *v = if *v < 0.0 { *v * slope } else { *v };
                }
            }
            return Ok(());
        }
        let b = b
            .broadcast(a.shape())
            .with_context(|| format!("PRelu slopes {:?} to {:?}", b.shape(), a.shape()))?;
        tract_ndarray::Zip::from(&mut a)
            .and(&b)
            .for_each(|v, &slope| {
                if *v < 0.0 {
                    *v *= slope;
                }
            });
        Ok(())
    }
}

impl BinMiniOp for PreluOp {
    fn name(&self) -> &'static str {
        "PRelu"
    }

    fn result_datum_type(&self, a: DatumType, _b: DatumType) -> TractResult<DatumType> {
        Ok(a)
    }

    fn operating_datum_type(&self, a: DatumType, _b: DatumType) -> TractResult<DatumType> {
        Ok(a)
    }

    fn is_commutative(&self) -> bool {
        false
    }

    fn eval_in_a(&self, a: &mut Tensor, b: &Tensor) -> TractResult<()> {
        Self::apply(a, b)
    }

    fn eval_out_of_place(&self, c: &mut Tensor, a: &Tensor, b: &Tensor) -> TractResult<()> {
        let a = a.broadcast_to_shape(c.shape())?;
        *c = a;
        Self::apply(c, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused operation gives what tract's own three-operation expansion gives, per channel
    /// and with slopes broadcast another way.
    #[test]
    fn one_pass_prelu_matches_the_definition() {
        // Per channel with and without the batch axis (tract drops a batch of one), one slope
        // per other axis, one slope for all, and slopes along two axes (the broadcast path).
        for (shape, slopes_shape) in [
            (vec![2, 3, 4, 5], vec![1, 3, 1, 1]),
            (vec![3, 4, 5], vec![3, 1, 1]),
            (vec![2, 3, 4, 5], vec![1, 1, 1, 5]),
            (vec![2, 3, 4, 5], vec![1, 1, 4, 1]),
            (vec![2, 3, 4, 5], vec![1, 1, 1, 1]),
            (vec![2, 3, 4, 5], vec![1, 3, 4, 1]),
        ] {
            let x: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|i| (i as f32 - 57.0) / 7.0)
                .collect();
            let a = Tensor::from_shape(&shape, &x).unwrap();
            let n: usize = slopes_shape.iter().product();
            let slopes: Vec<f32> = (0..n).map(|i| 0.1 + i as f32 * 0.05).collect();
            let b = Tensor::from_shape(&slopes_shape, &slopes).unwrap();
            let mut got = a.clone();
            PreluOp.eval_in_a(&mut got, &b).unwrap();
            let want = {
                let b = b.to_plain_array_view::<f32>().unwrap();
                let b = b.broadcast(a.shape()).unwrap();
                let a = a.to_plain_array_view::<f32>().unwrap();
                tract_ndarray::Zip::from(&a)
                    .and(&b)
                    .map_collect(|&v, &s| if v < 0.0 { v * s } else { v })
            };
            assert_eq!(
                got.to_plain_array_view::<f32>().unwrap(),
                want.view().into_dyn(),
                "slopes {slopes_shape:?}"
            );
        }
    }
}
