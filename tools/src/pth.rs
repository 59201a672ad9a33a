//! Reader for PyTorch `.pth` state dicts that needs neither Python nor libtorch's unpickler.
//!
//! Two layouts exist, both written by `torch.save`:
//!
//! - The legacy layout (PyTorch before 1.6, and `_use_new_zipfile_serialization=False`): a
//!   sequence of pickles in one file. They are the magic number `0x1950a86a20f9469cfc6c`, the
//!   protocol version 1001, a dict with system information (byte order, type sizes), the
//!   object itself, and the sorted list of storage keys. The storages follow, each as a
//!   little-endian u64 element count and the raw element bytes, in the order of that list.
//! - The zip layout (PyTorch 1.6 and later): `<prefix>/data.pkl` contains the object, and each
//!   storage is the raw file `<prefix>/data/<key>`.
//!
//! In both, a tensor is pickled as a call to `torch._utils._rebuild_tensor_v2(storage,
//! storage_offset, size, stride, requires_grad, backward_hooks)`, or to the older
//! `_rebuild_tensor(storage, storage_offset, size, stride)`. The storage argument is a
//! persistent id `('storage', storage_type, key, location, numel)`, followed in the legacy
//! layout by `view_metadata` (None, or the `(key, offset, numel)` of a view).
//!
//! The pickle machine below implements the opcodes of pickle protocols 2 to 5 that state
//! dicts use. It resolves only an allowlist of globals (`collections.OrderedDict`, the
//! tensor and parameter rebuild functions, the storage types) and rejects every other
//! global and opcode with an error, so loading a file never runs code from it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};

/// First pickle of a legacy `.pth` file, as pickled by `torch.save`.
const LEGACY_MAGIC_NUMBER: u128 = 0x1950a86a20f9469cfc6c;
/// Second pickle of a legacy `.pth` file.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// Element type of a stored tensor, named after PyTorch's storage classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Maps a storage class name of the `torch` module (`FloatStorage`, ...) to its dtype.
    fn from_storage_class(name: &str) -> Option<Self> {
        let dtype = match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        };
        Some(dtype)
    }

    /// Returns the size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        };
        f.write_str(name)
    }
}

/// One tensor of a state dict, copied out of its storage into contiguous row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Elements in row-major order, little-endian, `dtype.size()` bytes each.
    pub bytes: Vec<u8>,
}

impl PthTensor {
    /// Returns the number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes the elements as f32, failing for any other dtype.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        ensure!(
            self.dtype == DType::F32,
            "tensor has dtype {}, but only float32 tensors can be read as f32; convert the \
             checkpoint with `tensor.float()` before saving",
            self.dtype
        );
        let values = self
            .bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect();
        Ok(values)
    }

    /// Returns the tensor as a CPU `tch::Tensor` of kind `Float`, failing for other dtypes.
    pub fn to_tch(&self) -> Result<tch::Tensor> {
        let values = self.to_f32()?;
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        Ok(tch::Tensor::from_slice(&values).reshape(&shape))
    }
}

/// The tensors of a state dict, in the order the file lists them.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub tensors: Vec<(String, PthTensor)>,
}

impl StateDict {
    /// Returns the tensor named `name`, if present.
    pub fn get(&self, name: &str) -> Option<&PthTensor> {
        self.tensors
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, tensor)| tensor)
    }

    /// Returns the tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(name, _)| name.as_str())
    }

    /// Converts every tensor to a `tch::Tensor`, failing on the first that is not float32.
    pub fn to_tch(&self) -> Result<Vec<(String, tch::Tensor)>> {
        self.tensors
            .iter()
            .map(|(name, tensor)| {
                let converted = tensor
                    .to_tch()
                    .with_context(|| format!("tensor `{name}`"))?;
                Ok((name.clone(), converted))
            })
            .collect()
    }
}

/// Reads a state dict saved with `torch.save` in the legacy or the zip layout.
pub fn load(path: &Path) -> Result<StateDict> {
    let bytes =
        std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    load_bytes(&bytes).with_context(|| format!("failed to load PyTorch file {}", path.display()))
}

/// Reads a state dict from the bytes of a `.pth` file in either layout.
pub fn load_bytes(bytes: &[u8]) -> Result<StateDict> {
    if bytes.starts_with(b"PK\x03\x04") {
        load_zip(bytes)
    } else if bytes.first() == Some(&0x80) {
        load_legacy(bytes)
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        bail!(
            "this is a tar-based .pth file (PyTorch 0.1 to 0.3), which is not supported; \
             re-save it with a newer PyTorch"
        )
    } else {
        let head = &bytes[..bytes.len().min(4)];
        bail!("not a PyTorch file: it starts with bytes {head:02x?}, expected a zip archive or a pickle")
    }
}

/// A storage named by a persistent id, before its bytes are read.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    dtype: DType,
    /// Number of elements of the storage.
    numel: usize,
    /// Legacy layout only: the view `(offset, numel)` into the root storage `key`.
    view: Option<(usize, usize)>,
}

/// A tensor as the pickle describes it, before its storage is read.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    /// In elements from the start of the storage.
    offset: usize,
    shape: Vec<usize>,
    /// In elements.
    stride: Vec<usize>,
}

fn load_legacy(bytes: &[u8]) -> Result<StateDict> {
    let mut position = 0;
    let magic = Unpickler::new(bytes, position, None)
        .run()
        .context("invalid magic number pickle")?;
    position = magic.1;
    let magic = magic.0.as_int_u128().context("invalid magic number")?;
    ensure!(
        magic == LEGACY_MAGIC_NUMBER,
        "invalid magic number {magic:#x}, expected {LEGACY_MAGIC_NUMBER:#x}; the file is not a PyTorch \
         legacy save"
    );

    let (version, next) = Unpickler::new(bytes, position, None)
        .run()
        .context("invalid protocol version")?;
    position = next;
    let version = version.as_i64().context("invalid protocol version")?;
    ensure!(
        version == LEGACY_PROTOCOL_VERSION,
        "unsupported legacy protocol version {version}, expected {LEGACY_PROTOCOL_VERSION}"
    );

    let (system_info, next) = Unpickler::new(bytes, position, None)
        .run()
        .context("invalid system information pickle")?;
    position = next;
    if let Some(Value::Bool(false)) = system_info.dict_get("little_endian") {
        bail!("the file was saved on a big-endian machine, which is not supported");
    }

    let (object, next) = Unpickler::new(bytes, position, Some(PersistentLayout::Legacy))
        .run()
        .context("invalid state dict pickle")?;
    position = next;

    let (keys, next) = Unpickler::new(bytes, position, None)
        .run()
        .context("invalid storage key list")?;
    position = next;
    let keys = match keys {
        Value::List(items) => items
            .borrow()
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Result<Vec<_>>>()?,
        other => bail!(
            "invalid storage key list: expected a list, found {}",
            other.kind()
        ),
    };

    let roots = collect_root_storages(&object)?;
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let root = roots
            .get(&key)
            .ok_or_else(|| anyhow!("storage `{key}` is listed but no tensor uses it"))?;
        let header = bytes.get(position..position + 8).ok_or_else(|| {
            anyhow!("file truncated in the header of storage `{key}` at byte {position}")
        })?;
        let count = u64::from_le_bytes(header.try_into().expect("slice of 8 bytes")) as usize;
        position += 8;
        ensure!(
            count == root.numel,
            "storage `{key}` has {count} elements in the file but {} in the pickle",
            root.numel
        );
        let length = count
            .checked_mul(root.dtype.size())
            .ok_or_else(|| anyhow!("storage `{key}` size overflows"))?;
        let data = bytes.get(position..position + length).ok_or_else(|| {
            anyhow!(
                "file truncated in storage `{key}`: it needs {length} bytes from byte {position}, \
                 but the file has {}",
                bytes.len()
            )
        })?;
        position += length;
        storages.insert(key, data);
    }
    build_state_dict(&object, |storage| {
        storages
            .get(&storage.key)
            .copied()
            .ok_or_else(|| anyhow!("storage `{}` is missing from the storage list", storage.key))
    })
}

/// Returns, for each storage key, the root storage the legacy pickle names.
fn collect_root_storages(object: &Value) -> Result<HashMap<String, StorageRef>> {
    let mut roots = HashMap::new();
    for (name, value) in state_dict_entries(object)? {
        if let Value::Tensor(tensor) = value {
            let storage = &tensor.storage;
            let root = StorageRef {
                view: None,
                ..storage.clone()
            };
            if let Some(previous) = roots.insert(storage.key.clone(), root) {
                ensure!(
                    previous.dtype == storage.dtype && previous.numel == storage.numel,
                    "tensor `{name}` names storage `{}` with another dtype or size than an earlier \
                     tensor",
                    storage.key
                );
            }
        }
    }
    Ok(roots)
}

fn load_zip(bytes: &[u8]) -> Result<StateDict> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("invalid zip archive")?;
    let pickle_name = archive
        .file_names()
        .find(|name| name.ends_with("/data.pkl") && name.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!("the zip archive has no `<prefix>/data.pkl` entry; it is not a torch.save file")
        })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();

    if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry
            .read_to_string(&mut order)
            .context("failed to read the byteorder entry")?;
        ensure!(
            order.trim() == "little",
            "the file was saved with byte order `{order}`, only `little` is supported"
        );
    }

    let pickle = read_entry(&mut archive, &pickle_name)?;
    let (object, _) = Unpickler::new(&pickle, 0, Some(PersistentLayout::Zip))
        .run()
        .context("invalid data.pkl")?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for (_, value) in state_dict_entries(&object)? {
        if let Value::Tensor(tensor) = value {
            let key = &tensor.storage.key;
            if !storages.contains_key(key) {
                let data = read_entry(&mut archive, &format!("{prefix}data/{key}"))?;
                storages.insert(key.clone(), data);
            }
        }
    }
    build_state_dict(&object, |storage| {
        storages
            .get(&storage.key)
            .map(Vec::as_slice)
            .ok_or_else(|| anyhow!("storage `{}` not found", storage.key))
    })
}

fn read_entry(
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
) -> Result<Vec<u8>> {
    let mut entry = archive
        .by_name(name)
        .with_context(|| format!("zip entry `{name}` not found"))?;
    let mut data = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut data)
        .with_context(|| format!("failed to read zip entry `{name}`"))?;
    Ok(data)
}

/// Returns the entries of the unpickled top-level dict, which must map names to tensors.
fn state_dict_entries(object: &Value) -> Result<Vec<(String, Value)>> {
    let Value::Dict(entries) = object else {
        bail!(
            "the file contains a {}, expected a state dict (a dict of tensors)",
            object.kind()
        );
    };
    entries
        .borrow()
        .iter()
        .map(|(key, value)| {
            let name = key
                .as_str()
                .context("state dict key is not a string")?
                .to_owned();
            Ok((name, value.clone()))
        })
        .collect()
}

fn build_state_dict<'a>(
    object: &Value,
    storage_bytes: impl Fn(&StorageRef) -> Result<&'a [u8]>,
) -> Result<StateDict> {
    let mut tensors = Vec::new();
    for (name, value) in state_dict_entries(object)? {
        let Value::Tensor(tensor) = value else {
            bail!(
                "state dict entry `{name}` is a {}, expected a tensor; save `model.state_dict()` \
                 instead of a whole checkpoint",
                value.kind()
            );
        };
        let storage = storage_bytes(&tensor.storage)?;
        let tensor = copy_tensor(&tensor, storage).with_context(|| format!("tensor `{name}`"))?;
        tensors.push((name, tensor));
    }
    Ok(StateDict { tensors })
}

/// Copies a strided view out of its storage into a contiguous tensor.
fn copy_tensor(tensor: &TensorRef, storage: &[u8]) -> Result<PthTensor> {
    let storage_ref = &tensor.storage;
    let element_size = storage_ref.dtype.size();
    let (view_offset, view_numel) = storage_ref.view.unwrap_or((0, storage_ref.numel));
    ensure!(
        storage.len() >= (view_offset + view_numel) * element_size,
        "storage `{}` has {} bytes, but the tensor needs elements up to {}",
        storage_ref.key,
        storage.len(),
        view_offset + view_numel
    );
    let storage = &storage[view_offset * element_size..(view_offset + view_numel) * element_size];

    ensure!(
        tensor.shape.len() == tensor.stride.len(),
        "size {:?} and stride {:?} differ in rank",
        tensor.shape,
        tensor.stride
    );
    let numel: usize = tensor.shape.iter().product();
    if numel > 0 {
        let last = tensor.offset
            + tensor
                .shape
                .iter()
                .zip(&tensor.stride)
                .map(|(&size, &stride)| (size - 1) * stride)
                .sum::<usize>();
        ensure!(
            last < view_numel,
            "size {:?}, stride {:?} and offset {} reach element {last}, beyond the {view_numel} elements \
             of storage `{}`",
            tensor.shape,
            tensor.stride,
            tensor.offset,
            storage_ref.key
        );
    }

    let mut bytes = Vec::with_capacity(numel * element_size);
    let mut index = vec![0usize; tensor.shape.len()];
    for _ in 0..numel {
        let element = tensor.offset
            + index
                .iter()
                .zip(&tensor.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        bytes.extend_from_slice(&storage[element * element_size..(element + 1) * element_size]);
        for axis in (0..index.len()).rev() {
            index[axis] += 1;
            if index[axis] < tensor.shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(PthTensor {
        dtype: storage_ref.dtype,
        shape: tensor.shape.clone(),
        bytes,
    })
}

/// Form of the persistent ids that name storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PersistentLayout {
    /// `('storage', type, key, location, numel, view_metadata)` with optional view metadata.
    Legacy,
    /// `('storage', type, key, location, numel)`.
    Zip,
}

/// The globals the unpickler resolves; every other global is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    /// `_rebuild_tensor(storage, offset, size, stride)` of PyTorch before 0.4.
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Self> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch", storage) => match DType::from_storage_class(storage) {
                Some(dtype) => Self::Storage(dtype),
                None => bail!("the pickle references global `torch.{storage}`, which is not allowed"),
            },
            _ => bail!(
                "the pickle references global `{module}.{name}`, which is not allowed; only state \
                 dicts of dense tensors (OrderedDict, _rebuild_tensor_v2, storage types) can be loaded"
            ),
        };
        Ok(global)
    }
}

/// A value on the pickle machine's stack. Lists and dicts are shared, as in Python, so that
/// a memoized container includes later appends.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    /// Integers up to 128 bits (the legacy magic number needs 80).
    Int(i128),
    /// A float; state dicts never need its value.
    Float,
    Str(String),
    /// A bytes object; state dicts never need its content.
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(StorageRef),
    Tensor(Box<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn as_str(&self) -> Result<&str> {
        match self {
            Value::Str(text) => Ok(text),
            other => bail!("expected a str, found a {}", other.kind()),
        }
    }

    fn as_i64(&self) -> Result<i64> {
        match self {
            Value::Int(value) => {
                i64::try_from(*value).map_err(|_| anyhow!("integer {value} out of range"))
            }
            other => bail!("expected an int, found a {}", other.kind()),
        }
    }

    fn as_usize(&self) -> Result<usize> {
        match self {
            Value::Int(value) => usize::try_from(*value)
                .map_err(|_| anyhow!("expected a non-negative integer, found {value}")),
            other => bail!("expected an int, found a {}", other.kind()),
        }
    }

    fn as_int_u128(&self) -> Result<u128> {
        match self {
            Value::Int(value) => {
                u128::try_from(*value).map_err(|_| anyhow!("negative integer {value}"))
            }
            other => bail!("expected an int, found a {}", other.kind()),
        }
    }

    fn as_usize_tuple(&self) -> Result<Vec<usize>> {
        match self {
            Value::Tuple(items) => items.iter().map(Value::as_usize).collect(),
            other => bail!("expected a tuple of ints, found a {}", other.kind()),
        }
    }

    fn dict_get(&self, key: &str) -> Option<Value> {
        let Value::Dict(entries) = self else {
            return None;
        };
        let entries = entries.borrow();
        entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v.clone())
    }
}

/// A stack machine for the subset of the pickle protocol that `torch.save` emits.
struct Unpickler<'a> {
    data: &'a [u8],
    position: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Form of the persistent ids, or `None` when the pickle must not contain any.
    layout: Option<PersistentLayout>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], position: usize, layout: Option<PersistentLayout>) -> Self {
        Self {
            data,
            position,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            layout,
        }
    }

    /// Runs until STOP and returns the unpickled object and the byte position after STOP.
    fn run(mut self) -> Result<(Value, usize)> {
        loop {
            let start = self.position;
            let opcode = self.read_u8()?;
            let done = self
                .step(opcode)
                .with_context(|| format!("pickle opcode {opcode:#04x} at byte {start}"))?;
            if done {
                let value = self.pop()?;
                return Ok((value, self.position));
            }
        }
    }

    fn read(&mut self, count: usize) -> Result<&'a [u8]> {
        let end = self
            .position
            .checked_add(count)
            .ok_or_else(|| anyhow!("length {count} overflows"))?;
        let slice = self.data.get(self.position..end).ok_or_else(|| {
            anyhow!(
                "unexpected end of data: {count} bytes needed at byte {}, the file has {}",
                self.position,
                self.data.len()
            )
        })?;
        self.position = end;
        Ok(slice)
    }

    fn read_u8(&mut self) -> Result<u8> {
        Ok(self.read(1)?[0])
    }

    fn read_u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.read(2)?.try_into()?))
    }

    fn read_u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.read(4)?.try_into()?))
    }

    fn read_u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.read(8)?.try_into()?))
    }

    fn read_line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.position..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("unterminated text line"))?;
        let line = std::str::from_utf8(&rest[..end]).context("text line is not UTF-8")?;
        self.position += end + 1;
        Ok(line)
    }

    fn read_string(&mut self, length: usize) -> Result<Value> {
        let bytes = self.read(length)?;
        let text = std::str::from_utf8(bytes).context("string is not UTF-8")?;
        Ok(Value::Str(text.to_owned()))
    }

    fn pop(&mut self) -> Result<Value> {
        if self
            .marks
            .last()
            .is_some_and(|&mark| mark >= self.stack.len())
        {
            bail!("stack underflow: pop across a MARK");
        }
        self.stack.pop().ok_or_else(|| anyhow!("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| anyhow!("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no MARK on the stack"))?;
        ensure!(mark <= self.stack.len(), "MARK beyond the stack");
        Ok(self.stack.split_off(mark))
    }

    fn memoize(&mut self, index: u32) -> Result<()> {
        let value = self
            .stack
            .last()
            .ok_or_else(|| anyhow!("stack underflow"))?
            .clone();
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let value = self
            .memo
            .get(&index)
            .ok_or_else(|| anyhow!("memo entry {index} not found"))?
            .clone();
        self.stack.push(value);
        Ok(())
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<()> {
        let global = Global::resolve(module, name)?;
        self.stack.push(Value::Global(global));
        Ok(())
    }

    /// Executes one opcode and returns whether it was STOP.
    fn step(&mut self, opcode: u8) -> Result<bool> {
        match opcode {
            // PROTO
            0x80 => {
                let protocol = self.read_u8()?;
                ensure!(protocol <= 5, "unsupported pickle protocol {protocol}");
            }
            // FRAME: the frame length only helps buffered readers.
            0x95 => {
                self.read_u64()?;
            }
            b'.' => return Ok(true),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let value = self.top()?.clone();
                self.stack.push(value);
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            // BININT, BININT1, BININT2
            b'J' => {
                let value = self.read_u32()? as i32;
                self.stack.push(Value::Int(value.into()));
            }
            b'K' => {
                let value = self.read_u8()?;
                self.stack.push(Value::Int(value.into()));
            }
            b'M' => {
                let value = self.read_u16()?;
                self.stack.push(Value::Int(value.into()));
            }
            // LONG1, LONG4: little-endian two's complement of the given length.
            0x8a | 0x8b => {
                let length = if opcode == 0x8a {
                    self.read_u8()? as usize
                } else {
                    self.read_u32()? as usize
                };
                ensure!(
                    length <= 16,
                    "integer of {length} bytes does not fit in 128 bits"
                );
                let bytes = self.read(length)?;
                let mut buffer = [0u8; 16];
                buffer[..length].copy_from_slice(bytes);
                if length > 0 && bytes[length - 1] & 0x80 != 0 {
                    buffer[length..].fill(0xff);
                }
                self.stack.push(Value::Int(i128::from_le_bytes(buffer)));
            }
            // BINFLOAT: a big-endian f64.
            b'G' => {
                self.read(8)?;
                self.stack.push(Value::Float);
            }
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c => {
                let length = self.read_u8()? as usize;
                let value = self.read_string(length)?;
                self.stack.push(value);
            }
            b'X' => {
                let length = self.read_u32()? as usize;
                let value = self.read_string(length)?;
                self.stack.push(value);
            }
            0x8d => {
                let length = usize::try_from(self.read_u64()?)?;
                let value = self.read_string(length)?;
                self.stack.push(value);
            }
            // SHORT_BINSTRING, BINSTRING: Python 2 `str`, decoded as text.
            b'U' => {
                let length = self.read_u8()? as usize;
                let value = self.read_string(length)?;
                self.stack.push(value);
            }
            b'T' => {
                let length = self.read_u32()? as usize;
                let value = self.read_string(length)?;
                self.stack.push(value);
            }
            // SHORT_BINBYTES, BINBYTES
            b'C' => {
                let length = self.read_u8()? as usize;
                self.read(length)?;
                self.stack.push(Value::Bytes);
            }
            b'B' => {
                let length = self.read_u32()? as usize;
                self.read(length)?;
                self.stack.push(Value::Bytes);
            }
            // Memo: BINPUT, LONG_BINPUT, MEMOIZE, BINGET, LONG_BINGET, PUT, GET
            b'q' => {
                let index = self.read_u8()?;
                self.memoize(index.into())?;
            }
            b'r' => {
                let index = self.read_u32()?;
                self.memoize(index)?;
            }
            0x94 => {
                let index = u32::try_from(self.memo.len())?;
                self.memoize(index)?;
            }
            b'h' => {
                let index = self.read_u8()?;
                self.memo_get(index.into())?;
            }
            b'j' => {
                let index = self.read_u32()?;
                self.memo_get(index)?;
            }
            b'p' => {
                let index = self
                    .read_line()?
                    .trim()
                    .parse::<u32>()
                    .context("invalid PUT index")?;
                self.memoize(index)?;
            }
            b'g' => {
                let index = self
                    .read_line()?
                    .trim()
                    .parse::<u32>()
                    .context("invalid GET index")?;
                self.memo_get(index)?;
            }
            // Tuples
            b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let count = (opcode - 0x84) as usize;
                ensure!(self.stack.len() >= count, "stack underflow");
                let items = self.stack.split_off(self.stack.len() - count);
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            // Lists
            b']' => self.stack.push(Value::List(Rc::default())),
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            // Dicts
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b'd' => {
                let items = self.pop_mark()?;
                let dict = Value::Dict(Rc::default());
                Self::set_items(&dict, items)?;
                self.stack.push(dict);
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let dict = self.top()?.clone();
                Self::set_items(&dict, vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let dict = self.top()?.clone();
                Self::set_items(&dict, items)?;
            }
            // GLOBAL: module and name as two text lines; STACK_GLOBAL: both from the stack.
            b'c' => {
                let module = self.read_line()?;
                let name = self.read_line()?;
                self.push_global(module, name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                self.push_global(module.as_str()?, name.as_str()?)?;
            }
            b'R' => {
                let arguments = self.pop()?;
                let callable = self.pop()?;
                let result = Self::call(&callable, &arguments)?;
                self.stack.push(result);
            }
            // NEWOBJ: `cls.__new__(cls, *args)`, allowed for OrderedDict only.
            0x81 => {
                let arguments = self.pop()?;
                let class = self.pop()?;
                ensure!(
                    matches!(class, Value::Global(Global::OrderedDict)),
                    "NEWOBJ is only supported for collections.OrderedDict, found a {}",
                    class.kind()
                );
                let result = Self::call(&class, &arguments)?;
                self.stack.push(result);
            }
            // BUILD: sets the state of the object below. OrderedDict pickles its `_metadata`
            // attribute and tensors their Python attributes this way, neither of which a
            // state dict loader needs.
            b'b' => {
                let _state = self.pop()?;
                let target = self.top()?;
                ensure!(
                    matches!(target, Value::Dict(_) | Value::Tensor(_)),
                    "BUILD on a {} is not supported",
                    target.kind()
                );
            }
            // BINPERSID
            b'Q' => {
                let id = self.pop()?;
                let storage = self.persistent_load(&id)?;
                self.stack.push(storage);
            }
            b'P' => bail!("text persistent ids (PERSID) are not supported"),
            other => {
                let printable = if other.is_ascii_graphic() {
                    format!(" ('{}')", other as char)
                } else {
                    String::new()
                };
                bail!(
                    "unsupported pickle opcode {other:#04x}{printable}; state dicts do not use it"
                )
            }
        }
        Ok(false)
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(list) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            other => bail!("APPEND to a {}, expected a list", other.kind()),
        }
    }

    fn set_items(dict: &Value, items: Vec<Value>) -> Result<()> {
        let Value::Dict(entries) = dict else {
            bail!("SETITEM on a {}, expected a dict", dict.kind());
        };
        ensure!(items.len() % 2 == 0, "odd number of items for a dict");
        let mut entries = entries.borrow_mut();
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            let existing = match &key {
                Value::Str(text) => entries
                    .iter()
                    .position(|(k, _)| matches!(k, Value::Str(s) if s == text)),
                _ => None,
            };
            match existing {
                Some(index) => entries[index].1 = value,
                None => entries.push((key, value)),
            }
        }
        Ok(())
    }

    /// Applies an allowed global to its argument tuple (REDUCE).
    fn call(callable: &Value, arguments: &Value) -> Result<Value> {
        let Value::Global(global) = callable else {
            bail!("REDUCE on a {}, expected a global", callable.kind());
        };
        let Value::Tuple(arguments) = arguments else {
            bail!(
                "REDUCE arguments are a {}, expected a tuple",
                arguments.kind()
            );
        };
        match global {
            Global::OrderedDict => {
                let dict = Value::Dict(Rc::default());
                match arguments.first() {
                    None => {}
                    Some(Value::List(pairs)) => {
                        for pair in pairs.borrow().iter() {
                            let Value::Tuple(pair) = pair else {
                                bail!("OrderedDict item is not a pair")
                            };
                            ensure!(pair.len() == 2, "OrderedDict item is not a pair");
                            Self::set_items(&dict, pair.to_vec())?;
                        }
                    }
                    Some(other) => bail!("OrderedDict from a {} is not supported", other.kind()),
                }
                Ok(dict)
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let (function, arity) = match global {
                    Global::RebuildTensor => ("_rebuild_tensor", 4..=4),
                    _ => ("_rebuild_tensor_v2", 6..=7),
                };
                ensure!(
                    arity.contains(&arguments.len()),
                    "{function} takes {arity:?} arguments, found {}",
                    arguments.len()
                );
                let Value::Storage(storage) = &arguments[0] else {
                    bail!("{function} storage argument is a {}", arguments[0].kind());
                };
                let tensor = TensorRef {
                    storage: storage.clone(),
                    offset: arguments[1].as_usize().context("storage offset")?,
                    shape: arguments[2].as_usize_tuple().context("size")?,
                    stride: arguments[3].as_usize_tuple().context("stride")?,
                };
                Ok(Value::Tensor(Box::new(tensor)))
            }
            Global::RebuildParameter => {
                let data = arguments
                    .first()
                    .ok_or_else(|| anyhow!("_rebuild_parameter without arguments"))?;
                ensure!(
                    matches!(data, Value::Tensor(_)),
                    "_rebuild_parameter of a {}",
                    data.kind()
                );
                Ok(data.clone())
            }
            Global::Storage(_) => bail!("calling a storage class is not supported"),
        }
    }

    fn persistent_load(&self, id: &Value) -> Result<Value> {
        let layout = self
            .layout
            .ok_or_else(|| anyhow!("persistent id in a pickle that must not contain any"))?;
        let Value::Tuple(fields) = id else {
            bail!("persistent id is a {}, expected a tuple", id.kind());
        };
        ensure!(
            fields.first().and_then(|tag| tag.as_str().ok()) == Some("storage"),
            "persistent id does not start with 'storage'"
        );
        let expected = match layout {
            PersistentLayout::Legacy => 6,
            PersistentLayout::Zip => 5,
        };
        ensure!(
            fields.len() == expected,
            "persistent id has {} fields, expected {expected}",
            fields.len()
        );
        let dtype = match &fields[1] {
            Value::Global(Global::Storage(dtype)) => *dtype,
            other => bail!(
                "persistent id storage type is a {}, expected a torch storage class",
                other.kind()
            ),
        };
        let key = fields[2].as_str().context("storage key")?.to_owned();
        let numel = fields[4].as_usize().context("storage size")?;
        let view = match fields.get(5) {
            None | Some(Value::None) => None,
            // NOTE: no test file has a legacy view (a tensor saved as a view of a larger
            // storage), so this branch is checked only by reading.
            Some(Value::Tuple(view)) => {
                ensure!(
                    view.len() == 3,
                    "view metadata has {} fields, expected 3",
                    view.len()
                );
                let offset = view[1].as_usize().context("view offset")?;
                let size = view[2].as_usize().context("view size")?;
                ensure!(
                    offset + size <= numel,
                    "view of {size} elements at offset {offset} exceeds storage `{key}` of {numel}"
                );
                Some((offset, size))
            }
            Some(other) => bail!(
                "view metadata is a {}, expected a tuple or None",
                other.kind()
            ),
        };
        Ok(Value::Storage(StorageRef {
            key,
            dtype,
            numel,
            view,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pickles `{'w': _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}`
    /// with protocol 2 for the zip layout.
    fn state_dict_pickle(offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend_from_slice(&[b'K', offset, b'(']);
        for &d in size {
            p.extend_from_slice(&[b'K', d]);
        }
        p.extend_from_slice(b"t(");
        for &s in stride {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRs.");
        p
    }

    fn run_pickle(pickle: &[u8]) -> Result<Value> {
        Ok(Unpickler::new(pickle, 0, Some(PersistentLayout::Zip))
            .run()?
            .0)
    }

    fn storage_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn transposed_view_is_copied_contiguous() {
        // A 2x3 tensor stored column-major, i.e. the transpose of a contiguous 3x2 tensor.
        let object = run_pickle(&state_dict_pickle(0, &[2, 3], &[1, 2])).unwrap();
        let storage = storage_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let dict = build_state_dict(&object, |_| Ok(storage.as_slice())).unwrap();
        let tensor = dict.get("w").unwrap();
        assert_eq!(tensor.shape, vec![2, 3]);
        assert_eq!(tensor.to_f32().unwrap(), vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    }

    #[test]
    fn storage_offset_is_applied() {
        let object = run_pickle(&state_dict_pickle(2, &[2, 2], &[2, 1])).unwrap();
        let storage = storage_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let dict = build_state_dict(&object, |_| Ok(storage.as_slice())).unwrap();
        assert_eq!(
            dict.get("w").unwrap().to_f32().unwrap(),
            vec![2.0, 3.0, 4.0, 5.0]
        );
    }

    #[test]
    fn view_beyond_storage_is_rejected() {
        let object = run_pickle(&state_dict_pickle(3, &[2, 2], &[2, 1])).unwrap();
        let storage = storage_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let error = build_state_dict(&object, |_| Ok(storage.as_slice())).unwrap_err();
        assert!(
            format!("{error:#}").contains("beyond the 6 elements"),
            "{error:#}"
        );
    }

    #[test]
    fn disallowed_global_is_rejected() {
        let pickle = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let error = run_pickle(pickle).unwrap_err();
        assert!(format!("{error:#}").contains("`os.system`"), "{error:#}");
    }

    #[test]
    fn unknown_opcode_is_rejected() {
        let error = run_pickle(b"\x80\x02\xff.").unwrap_err();
        assert!(
            format!("{error:#}").contains("unsupported pickle opcode 0xff"),
            "{error:#}"
        );
    }

    #[test]
    fn long1_decodes_magic_number() {
        let pickle = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        let value = run_pickle(pickle).unwrap();
        assert_eq!(value.as_int_u128().unwrap(), LEGACY_MAGIC_NUMBER);
    }

    #[test]
    fn long1_decodes_negative() {
        let value = run_pickle(b"\x80\x02\x8a\x02\x00\xff.").unwrap();
        assert_eq!(value.as_i64().unwrap(), -256);
    }

    #[test]
    fn non_float_tensor_fails_conversion() {
        let tensor = PthTensor {
            dtype: DType::I64,
            shape: vec![1],
            bytes: vec![0; 8],
        };
        let error = tensor.to_f32().unwrap_err();
        assert!(error.to_string().contains("int64"), "{error}");
    }
}
