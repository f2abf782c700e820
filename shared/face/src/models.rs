//! The vendored ONNX models: their bytes, checked against pinned SHA-256 digests, and their loading
//! into optimised tract plans.

use std::{collections::HashMap, path::Path, sync::Arc};

use sha2::{Digest, Sha256};
use tract_onnx::{pb, prelude::*};

use crate::FaceError;

/// A loaded, optimised model, safe to run from several threads at once.
pub type Plan = Arc<TypedRunnableModel>;

/// One vendored model file.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile {
    /// File name under the models directory.
    pub file: &'static str,
    /// Its SHA-256, as published in `models/SOURCES.md`.
    pub sha256: &'static str,
}

/// YuNet face detector, fp32, dynamic input size.
pub const YUNET: ModelFile = ModelFile {
    file: "face_detection_yunet_2026may.onnx",
    sha256: "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0",
};
/// SFace recognizer, int8 blocked quantisation (folded to fp32 at load).
pub const SFACE: ModelFile = ModelFile {
    file: "face_recognition_sface_2021dec_int8bq.onnx",
    sha256: "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
};
/// MiniFASNetV2 liveness, crop scale 2.7.
pub const FAS_V2: ModelFile = ModelFile {
    file: "2.7_80x80_MiniFASNetV2.onnx",
    sha256: "1428cafb9977d7ecc40ff73973f29ba5fc21c743aab70c75d854c3f13d5da813",
};
/// MiniFASNetV1SE liveness, crop scale 4.0.
pub const FAS_V1SE: ModelFile = ModelFile {
    file: "4_0_0_80x80_MiniFASNetV1SE.onnx",
    sha256: "f5104eadc58f60e7de02ea72134a5f3d3418ee560a064cb752ea49aa1aaab22e",
};

/// The models directory inside this crate, where the files are vendored.
pub fn default_models_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Reads a model file and refuses it unless its SHA-256 matches the pinned one.
pub fn read_checked(dir: &Path, model: ModelFile) -> Result<Vec<u8>, FaceError> {
    let path = dir.join(model.file);
    let bytes =
        std::fs::read(&path).map_err(|e| FaceError::Model(format!("{}: {e}", path.display())))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != model.sha256 {
        return Err(FaceError::Model(format!(
            "{}: sha256 {digest} does not match the pinned {}",
            path.display(),
            model.sha256
        )));
    }
    Ok(bytes)
}

fn model_error(e: impl std::fmt::Display) -> FaceError {
    FaceError::Model(format!("{e:#}"))
}

/// Parses an ONNX file, folds its constant (blocked) DequantizeLinear nodes into fp32
/// initializers, drops graph inputs nothing uses, fixes the input shape and optimises.
pub fn load_plan(bytes: &[u8], input_shape: [usize; 4]) -> Result<Plan, FaceError> {
    let mut proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(model_error)?;
    if let Some(graph) = proto.graph.as_mut() {
        fold_dequantize(graph)?;
        drop_unused_inputs(graph);
    }
    plan_from_proto(&proto, input_shape)
}

/// A model parsed once whose plans are built per input size (the dynamic YuNet).
pub struct SizedPlans {
    proto: pb::ModelProto,
    plans: std::sync::Mutex<HashMap<[usize; 4], Plan>>,
}

impl SizedPlans {
    /// Parses the model; plans are built on first use of each size.
    pub fn new(bytes: &[u8]) -> Result<Self, FaceError> {
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(model_error)?;
        Ok(SizedPlans {
            proto,
            plans: Default::default(),
        })
    }

    /// The plan for an input shape, built and cached on first use.
    pub fn plan(&self, shape: [usize; 4]) -> Result<Plan, FaceError> {
        if let Some(plan) = self.plans.lock().expect("not poisoned").get(&shape) {
            return Ok(plan.clone());
        }
        let plan = plan_from_proto(&self.proto, shape)?;
        self.plans
            .lock()
            .expect("not poisoned")
            .insert(shape, plan.clone());
        Ok(plan)
    }
}

fn plan_from_proto(proto: &pb::ModelProto, shape: [usize; 4]) -> Result<Plan, FaceError> {
    // `PRelu` in one pass ([`crate::prelu`]), not tract's three.
    crate::prelu::onnx()
        .model_for_proto_model(proto)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(model_error)
}

const ONNX_FLOAT: i32 = 1;
const ONNX_UINT8: i32 = 2;
const ONNX_INT8: i32 = 3;

fn tensor_i32_values(t: &pb::TensorProto) -> Result<Vec<i32>, FaceError> {
    match t.data_type {
        ONNX_INT8 if !t.raw_data.is_empty() => {
            Ok(t.raw_data.iter().map(|b| i32::from(*b as i8)).collect())
        }
        ONNX_UINT8 if !t.raw_data.is_empty() => {
            Ok(t.raw_data.iter().map(|b| i32::from(*b)).collect())
        }
        ONNX_INT8 | ONNX_UINT8 => Ok(t.int32_data.clone()),
        other => Err(FaceError::Model(format!(
            "{}: quantized type {other} is not int8/uint8",
            t.name
        ))),
    }
}

fn tensor_f32_values(t: &pb::TensorProto) -> Result<Vec<f32>, FaceError> {
    if t.data_type != ONNX_FLOAT {
        return Err(FaceError::Model(format!(
            "{}: scale type {} is not float",
            t.name, t.data_type
        )));
    }
    if !t.raw_data.is_empty() {
        Ok(t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    } else {
        Ok(t.float_data.clone())
    }
}

/// Replaces each DequantizeLinear whose inputs are all initializers by an fp32 initializer holding
/// its result. Handles per-tensor, per-axis and blocked (opset 21 `block_size`) quantisation:
/// element `i` uses the scale and zero point at `i` with its `axis` coordinate divided by the block
/// size (1 for per-axis, the whole axis for per-tensor).
fn fold_dequantize(graph: &mut pb::GraphProto) -> Result<(), FaceError> {
    let mut folded = Vec::new();
    let mut keep = Vec::new();
    let nodes = std::mem::take(&mut graph.node);
    for node in nodes {
        let constant = node.op_type == "DequantizeLinear"
            && node
                .input
                .iter()
                .all(|i| graph.initializer.iter().any(|t| &t.name == i));
        if !constant {
            keep.push(node);
            continue;
        }
        let find = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .expect("checked above")
        };
        let data = find(&node.input[0]);
        let scale = find(&node.input[1]);
        let zero = node.input.get(2).filter(|n| !n.is_empty()).map(|n| find(n));
        let attr = |name: &str, default: i64| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.i)
                .unwrap_or(default)
        };
        let dims: Vec<usize> = data.dims.iter().map(|d| *d as usize).collect();
        let rank = dims.len().max(1) as i64;
        let axis = attr("axis", 1).rem_euclid(rank) as usize;
        let q = tensor_i32_values(data)?;
        let scales = tensor_f32_values(scale)?;
        let zeros = match zero {
            Some(z) => tensor_i32_values(z)?,
            None => vec![0; scales.len()],
        };
        let scale_dims: Vec<usize> = scale.dims.iter().map(|d| *d as usize).collect();
        let values: Vec<f32> = if scales.len() == 1 {
            q.iter()
                .map(|v| (v - zeros[0]) as f32 * scales[0])
                .collect()
        } else {
            let block = match attr("block_size", 0) {
                0 => 1,
                b => b as usize,
            };
            // Strides of the data and of the scale tensor (scale has data's rank when blocked,
            // rank 1 along `axis` when per-axis).
            let strides = |shape: &[usize]| {
                let mut s = vec![1usize; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    s[i] = s[i + 1] * shape[i + 1];
                }
                s
            };
            let data_strides = strides(&dims);
            let blocked = scale_dims.len() == dims.len();
            let scale_strides = strides(&scale_dims);
            (0..q.len())
                .map(|i| {
                    let scale_index = if blocked {
                        (0..dims.len())
                            .map(|d| {
                                let coord = (i / data_strides[d]) % dims[d];
                                let coord = if d == axis { coord / block } else { coord };
                                coord * scale_strides[d]
                            })
                            .sum()
                    } else {
                        (i / data_strides[axis]) % dims[axis]
                    };
                    (q[i] - zeros[scale_index]) as f32 * scales[scale_index]
                })
                .collect()
        };
        let mut tensor = pb::TensorProto {
            name: node.output[0].clone(),
            dims: data.dims.clone(),
            data_type: ONNX_FLOAT,
            ..Default::default()
        };
        tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        folded.push(tensor);
    }
    graph.node = keep;
    graph.initializer.extend(folded);
    Ok(())
}

/// Removes graph inputs that are neither initializers nor read by any node (left behind by the
/// quantizer); tract would otherwise expect them to be fed.
fn drop_unused_inputs(graph: &mut pb::GraphProto) {
    let used: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let initializers: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    let keep: Vec<pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| used.contains(i.name.as_str()) && !initializers.contains(&i.name))
        .cloned()
        .collect();
    graph.input = keep;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prelu_runs_as_one_operation_in_the_optimised_plans() {
        // SFace holds 27 PReLUs, each MiniFASNet 33: each is one operation of the plan, and
        // tract's three-operation expansion (its select) is gone.
        for (model, shape, prelus) in [(SFACE, [1, 3, 112, 112], 27), (FAS_V2, [1, 3, 80, 80], 33)]
        {
            let bytes = read_checked(&default_models_dir(), model).unwrap();
            let plan = load_plan(&bytes, shape).unwrap();
            let names: Vec<String> = plan
                .model()
                .nodes()
                .iter()
                .map(|n| n.op().name().to_string())
                .collect();
            let fused = names.iter().filter(|n| n.as_str() == "PRelu").count();
            assert_eq!(fused, prelus, "{} ops: {names:?}", model.file);
            assert!(
                !names.iter().any(|n| n == "Iff"),
                "{} ops: {names:?}",
                model.file
            );
        }
    }

    #[test]
    fn tampered_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FAS_V2.file), b"not the model").unwrap();
        let err = read_checked(dir.path(), FAS_V2).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        if let Err(e) = read_checked(&default_models_dir(), FAS_V2) {
            panic!("vendored model refused: {e}");
        }
    }

    #[test]
    fn blocked_dequantize_folds() {
        let q = pb::TensorProto {
            name: "q".into(),
            dims: vec![2, 4],
            data_type: ONNX_INT8,
            raw_data: [1i8, 2, 3, 4, -1, -2, -3, -4]
                .iter()
                .map(|v| *v as u8)
                .collect(),
            ..Default::default()
        };
        let s = pb::TensorProto {
            name: "s".into(),
            dims: vec![2, 2],
            data_type: ONNX_FLOAT,
            float_data: vec![1.0, 10.0, 2.0, 20.0],
            ..Default::default()
        };
        let z = pb::TensorProto {
            name: "z".into(),
            dims: vec![2, 2],
            data_type: ONNX_INT8,
            raw_data: vec![0, 1, 0, 0],
            ..Default::default()
        };
        let node = pb::NodeProto {
            op_type: "DequantizeLinear".into(),
            input: vec!["q".into(), "s".into(), "z".into()],
            output: vec!["out".into()],
            attribute: vec![
                pb::AttributeProto {
                    name: "axis".into(),
                    i: 1,
                    ..Default::default()
                },
                pb::AttributeProto {
                    name: "block_size".into(),
                    i: 2,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut graph = pb::GraphProto {
            node: vec![node],
            initializer: vec![q, s, z],
            ..Default::default()
        };
        fold_dequantize(&mut graph).unwrap();
        assert!(graph.node.is_empty());
        let out = graph.initializer.iter().find(|t| t.name == "out").unwrap();
        let values = tensor_f32_values(out).unwrap();
        // Row 0: block 0 scale 1 zero 0, block 1 scale 10 zero 1; row 1: scales 2 and 20.
        assert_eq!(values, vec![1.0, 2.0, 20.0, 30.0, -2.0, -4.0, -60.0, -80.0]);
    }
}
