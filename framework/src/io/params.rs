//! A module's float parameters by dotted path (`blocks.0.attn.wq.weight`), to and from
//! safetensors. The path is the field path of the Burn module, so any module can be saved.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
use crate::io::atomic_write;

/// A host copy of one tensor: shape and f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> Self {
        let data = tensor.to_data().convert::<f32>();
        Self {
            shape: data.shape.to_vec(),
            values: data.to_vec().unwrap_or_default(),
        }
    }

    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(self.values.clone(), self.shape.clone()),
            device,
        )
    }

    /// `[rows, cols]` → `[cols, rows]`.
    pub fn transposed(&self) -> Self {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut values = vec![0.0; self.values.len()];
        for r in 0..rows {
            for c in 0..cols {
                values[c * rows + r] = self.values[r * cols + c];
            }
        }
        Self {
            shape: vec![cols, rows],
            values,
        }
    }
}

/// Collects the float parameters whose path `wanted` accepts.
struct Collect<'a> {
    path: Vec<String>,
    wanted: &'a dyn Fn(&str) -> bool,
    out: BTreeMap<String, HostTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.path.join(".");
        if (self.wanted)(&path) {
            self.out.insert(path, HostTensor::from_tensor(&param.val()));
        }
    }
}

/// Every float parameter of `module`, by path.
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, HostTensor> {
    named_params_where(module, &|_| true)
}

/// The float parameters of `module` whose path `wanted` accepts.
pub fn named_params_where<B: Backend, M: Module<B>>(
    module: &M,
    wanted: &dyn Fn(&str) -> bool,
) -> BTreeMap<String, HostTensor> {
    let mut visitor = Collect {
        path: Vec::new(),
        wanted,
        out: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// One float parameter of `module` by path, copied to the host; the others are not touched, so
/// a writer can stream a large model one tensor at a time.
pub fn named_param<B: Backend, M: Module<B>>(module: &M, path: &str) -> Option<HostTensor> {
    let mut visitor = Collect {
        path: Vec::new(),
        wanted: &|p| p == path,
        out: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.out.remove(path)
}

/// The path and shape of every float parameter of `module` (nothing is copied).
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes {
        path: Vec<String>,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_owned());
        }

        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(self.path.join("."), param.shape().to_vec());
        }
    }
    let mut visitor = Shapes {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

struct Count<'a> {
    path: Vec<String>,
    wanted: &'a dyn Fn(&str) -> bool,
    total: usize,
    bytes: usize,
}

impl<B: Backend> ModuleVisitor<B> for Count<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if (self.wanted)(&self.path.join(".")) {
            let values = param.shape().num_elements();
            self.total += values;
            self.bytes += values * param.val().dtype().size();
        }
    }
}

/// How many float values the parameters whose path `wanted` accepts hold (nothing is copied).
pub fn count_params_where<B: Backend, M: Module<B>>(
    module: &M,
    wanted: &dyn Fn(&str) -> bool,
) -> usize {
    measure(module, wanted).total
}

/// Bytes that the parameters whose path `wanted` accepts take, each in its stored type.
pub fn param_bytes_where<B: Backend, M: Module<B>>(
    module: &M,
    wanted: &dyn Fn(&str) -> bool,
) -> usize {
    measure(module, wanted).bytes
}

fn measure<'a, B: Backend, M: Module<B>>(
    module: &M,
    wanted: &'a dyn Fn(&str) -> bool,
) -> Count<'a> {
    let mut visitor = Count {
        path: Vec::new(),
        wanted,
        total: 0,
        bytes: 0,
    };
    module.visit(&mut visitor);
    visitor
}

struct Assign<'a> {
    path: Vec<String>,
    wanted: &'a dyn Fn(&str) -> bool,
    source: &'a HashMap<String, HostTensor>,
    errors: Vec<String>,
    used: usize,
}

impl<B: Backend> ModuleMapper<B> for Assign<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        if !(self.wanted)(&name) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.source.get(&name) {
            None => {
                self.errors.push(format!("missing tensor `{name}`"));
                tensor
            }
            Some(found) if found.shape != tensor.dims() => {
                self.errors.push(format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    found.shape,
                    tensor.dims()
                ));
                tensor
            }
            Some(found) => {
                self.used += 1;
                let loaded = found.to_tensor::<B, D>(&tensor.device());
                if tensor.is_require_grad() {
                    loaded.require_grad()
                } else {
                    loaded
                }
            }
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Replaces every float parameter of `module` with the tensor of the same path in `source`.
/// Missing tensors, wrong shapes and unused tensors are errors (listed together).
pub fn assign_params<B: Backend, M: Module<B>>(
    module: M,
    source: &HashMap<String, HostTensor>,
    origin: &Path,
) -> Result<M> {
    assign_params_where(module, source, origin, &|_| true)
}

/// [`assign_params`] for the parameters whose path `wanted` accepts; the others keep their values.
pub fn assign_params_where<B: Backend, M: Module<B>>(
    module: M,
    source: &HashMap<String, HostTensor>,
    origin: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<M> {
    let mut mapper = Assign {
        path: Vec::new(),
        wanted,
        source,
        errors: Vec::new(),
        used: 0,
    };
    let module = module.map(&mut mapper);
    if mapper.used < source.len() && mapper.errors.is_empty() {
        let expected = named_params_where::<B, M>(&module, wanted);
        let unused: Vec<&String> = source
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .take(5)
            .collect();
        mapper
            .errors
            .push(format!("tensors the model has no place for: {unused:?}"));
    }
    if mapper.errors.is_empty() {
        Ok(module)
    } else {
        Err(Error::file(origin, mapper.errors.join("; ")))
    }
}

/// Writes tensors (f32) and string metadata to a safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::file(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let encoded =
        safetensors::serialize(views, Some(metadata)).map_err(|e| Error::file(path, e))?;
    atomic_write(path, |f| f.write_all(&encoded))
}

/// Reads every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted).
pub fn load_safetensors(
    path: &Path,
) -> Result<(HashMap<String, HostTensor>, HashMap<String, String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: read-only map of a file we do not modify while it is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
                ));
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok((out, metadata))
}
