//! The cranelift JIT for the kernel IR: each fused kernel
//! (`compiler::kernel::Kernel`) becomes native code that computes one
//! segment of its loop nest.
//!
//! The walk over the loop nest is the interpreter's ([`interp::Nest`]): the compiled code receives each argument's base
//! pointer and its offset at the segment's first position, the segment's
//! length, the position's row-major index (dropout's counter) and the
//! step's seed. The arguments' strides along the innermost dim are
//! constants of the code. The segment is walked in chunks of `CHUNK`
//! positions, each in stages (see `Emit`): arithmetic in registers, four
//! positions at a time in 128-bit vectors where every argument is read and
//! written at stride 0 or 1 (cranelift's SIMD), with a scalar tail; every
//! other function over the whole chunk at once.
//!
//! A value is computed with the same operations in the same order as the
//! interpreter, so the results are the same bits: +, −, ×, ÷, √, negation
//! and absolute value are single IEEE operations in both; every other
//! function (exp, tanh, GELU and the activations' derivatives, powers,
//! dropout's uniform draw, a position along the row, a comparison) is a
//! call, over a chunk's values, into the interpreter's own function for it.
//!
//! Compiled code is cached for the process by what it depends on (the
//! body, the stores, the inner strides), so the layers of a model and the
//! ranks of a layout share it.

use super::interp::{self, Args};
use cranelift_codegen::Context;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    AbiParam, BlockArg, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type, UserFuncName, Value,
    types,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module, default_libcall_names};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use tessera_compiler::ir::{BinaryOp, DType, UnaryOp};
use tessera_compiler::kernel::{Expr, Kernel};

/// A compiled kernel: `(bases, offsets, len, start, seed)` computes `len`
/// positions from row-major position `start`, each argument `i` at element
/// `offsets[i]` of `bases[i]` and on at its inner stride.
pub type Segment = unsafe extern "C" fn(*const *mut f32, *const usize, usize, usize, u64);

/// The process's compiled kernels.
struct State {
    module: JITModule,
    ctx: Context,
    fctx: FunctionBuilderContext,
    cache: HashMap<String, Segment>,
    /// Functions declared so far (each gets the next number as its name).
    declared: usize,
    /// Kernels compiled, and the seconds it took.
    compiled: usize,
    seconds: f64,
}

// SAFETY: the module's raw pointers address code and data it owns; it is
// only reached through the mutex below, one thread at a time.
unsafe impl Send for State {}

static JIT: LazyLock<Result<Mutex<State>, String>> = LazyLock::new(|| {
    let mut flags = settings::builder();
    for (k, v) in [("opt_level", "speed"), ("is_pic", "false"), ("use_colocated_libcalls", "false")] {
        flags.set(k, v).map_err(|e| format!("cranelift setting {k}: {e}"))?;
    }
    let isa = cranelift_native::builder()
        .map_err(|e| format!("cranelift cannot compile for this machine: {e}; run with `--backend interp`"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("cranelift cannot target this machine: {e}; run with `--backend interp`"))?;
    let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let ctx = module.make_context();
    Ok(Mutex::new(State {
        module,
        ctx,
        fctx: FunctionBuilderContext::new(),
        cache: HashMap::new(),
        declared: 0,
        compiled: 0,
        seconds: 0.0,
    }))
});

fn state() -> Result<std::sync::MutexGuard<'static, State>, String> {
    let s = JIT.as_ref().map_err(Clone::clone)?;
    Ok(s.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Kernels compiled in this process so far, and the seconds spent compiling them.
pub fn stats() -> (usize, f64) {
    state().map(|s| (s.compiled, s.seconds)).unwrap_or((0, 0.0))
}

/// The native code of kernel `k`, compiled on first use.
pub fn compile(k: &Kernel) -> Result<Segment, String> {
    k.check()?;
    if k.is_row() {
        return Err("a kernel with row reductions compiles as its elementwise passes (`backend::rows`)".into());
    }
    let nest = interp::Nest::of(k);
    let inner: Vec<usize> = (0..nest.strides.len()).map(|a| nest.inner(a)).collect();
    let key = k.code_key(false);
    let mut s = state()?;
    if let Some(f) = s.cache.get(&key) {
        return Ok(*f);
    }
    let t0 = std::time::Instant::now();
    let State { module, ctx, fctx, declared, .. } = &mut *s;
    let mut sig = module.make_signature();
    sig.params.extend([AbiParam::new(types::I64); 5]);
    let name = format!("kernel_{declared}");
    *declared += 1;
    let id = module.declare_function(&name, Linkage::Local, &sig).map_err(|e| e.to_string())?;
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
        Emit::function(&mut b, k, &inner, module.isa().default_call_conv());
        b.finalize(module.target_config());
    }
    let defined = module.define_function(id, ctx);
    module.clear_context(ctx);
    defined.map_err(|e| {
        format!("cranelift rejected kernel [{}]: {e:?}; run with `--backend interp` and report it", k.ops.join(", "))
    })?;
    module.finalize_definitions().map_err(|e| e.to_string())?;
    // SAFETY: the function was defined with `Segment`'s signature (five
    // 64-bit integers, the platform's C convention) and is finalized.
    let f: Segment = unsafe { std::mem::transmute(module.get_finalized_function(id)) };
    s.cache.insert(key, f);
    s.compiled += 1;
    s.seconds += t0.elapsed().as_secs_f64();
    Ok(f)
}

/// Run compiled kernel `f` (walked as `nest`, its kernel's [`interp::Nest`])
/// over loop positions `first .. first + count`.
///
/// # Safety
/// As [`interp::run`]: every pointer in `args` addresses the elements its
/// strides reach, no other thread touches these positions' elements, and a
/// store's elements are read by a load only at the same position.
pub unsafe fn run(f: Segment, nest: &interp::Nest, args: &Args, seed: u64, first: usize, count: usize) {
    nest.segments(first, count, usize::MAX, |offsets, start, len| {
        // SAFETY: the caller's contract, for this segment's positions.
        unsafe { f(args.0.as_ptr(), offsets.as_ptr(), len, start, seed) }
    });
}

// The functions the code calls, over a chunk's values: the interpreter's own.

/// The unary ops by number, as the code passes them.
const UNARY: [UnaryOp; 13] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Tanh,
    UnaryOp::Abs,
    UnaryOp::Square,
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
    UnaryOp::Silu,
    UnaryOp::Relu,
    UnaryOp::Sigmoid,
];

/// Slices of `n` values at `p`.
///
/// # Safety
/// `p` addresses `n` initialized f32 values (a chunk's array on the code's stack).
unsafe fn values<'a>(p: *const f32, n: usize) -> &'a [f32] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p, n) }
}

/// # Safety
/// As [`values`], writable, and not overlapping any other slice in use.
unsafe fn values_mut<'a>(p: *mut f32, n: usize) -> &'a mut [f32] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

// SAFETY (all of them): the code passes arrays of its stack frame, each
// `CHUNK` values long, `n` ≤ CHUNK of them computed, the output distinct.
unsafe extern "C" fn call_unary(op: u32, x: *const f32, o: *mut f32, n: usize) {
    unsafe { interp::unary(UNARY[op as usize], values(x, n), values_mut(o, n)) }
}
unsafe extern "C" fn call_unary_grad(op: u32, x: *const f32, g: *const f32, o: *mut f32, n: usize) {
    unsafe { interp::unary_grad(UNARY[op as usize], values(x, n), values(g, n), values_mut(o, n)) }
}
unsafe extern "C" fn call_index(o: *mut f32, n: usize, start: usize, row: usize) {
    unsafe { interp::index(values_mut(o, n), start, row) }
}
unsafe extern "C" fn call_equal(a: *const f32, b: *const f32, o: *mut f32, n: usize) {
    unsafe { interp::equal(values(a, n), values(b, n), values_mut(o, n)) }
}
unsafe extern "C" fn call_pow(x: *const f32, o: *mut f32, n: usize, e: f32) {
    unsafe { interp::pow(values(x, n), values_mut(o, n), e) }
}
unsafe extern "C" fn call_round(x: *const f32, o: *mut f32, n: usize, dtype: u32) {
    let dtype = if dtype == 1 { DType::F16 } else { DType::Bf16 };
    unsafe { interp::round(values(x, n), values_mut(o, n), dtype) }
}
unsafe extern "C" fn call_dropout(x: *const f32, o: *mut f32, n: usize, seed: u64, rng: u64, start: u64, p: f64) {
    unsafe { interp::dropout(values(x, n), values_mut(o, n), seed, rng, start, p) }
}

/// Whether `op` is one instruction of the code (else a call).
fn native(op: UnaryOp) -> bool {
    matches!(op, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sqrt | UnaryOp::Square)
}

/// Whether body value `e` is computed by a call over the chunk.
fn is_call(e: &Expr) -> bool {
    match *e {
        Expr::Unary { op, .. } => !native(op),
        Expr::UnaryGrad { .. }
        | Expr::Pow { .. }
        | Expr::Dropout { .. }
        | Expr::Round { .. }
        | Expr::Index
        | Expr::Equal { .. } => true,
        _ => false,
    }
}

/// Positions a chunk holds.
const CHUNK: usize = 256;

const F32X4: Type = types::F32X4;

fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The code of one kernel, as it is built.
///
/// The segment is walked in chunks of [`CHUNK`] positions. A chunk runs in
/// stages: the values that need no call are computed in a loop over the
/// chunk's positions (four at a time where the strides allow), the values
/// a call needs are kept in arrays on the stack, the calls run over whole
/// arrays, and the next stage's loop reads their results. A value's stage
/// is that of its latest operand, one more after a call.
struct Emit<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    k: &'a Kernel,
    inner: &'a [usize],
    call_conv: cranelift_codegen::isa::CallConv,
    /// Each argument's pointer at the segment's first position.
    at: Vec<Value>,
    /// Body values that are the same at every position (constants,
    /// elements, stride-0 loads), computed once: (scalar, vector).
    hoisted: Vec<Option<(Value, Value)>>,
    stage: Vec<usize>,
    /// The chunk array of each value that lives past its stage's loop or feeds a call.
    array: Vec<Option<cranelift_codegen::ir::StackSlot>>,
}

impl Emit<'_, '_> {
    fn function(b: &mut FunctionBuilder<'_>, k: &Kernel, inner: &[usize], call_conv: cranelift_codegen::isa::CallConv) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let [bases_p, offs_p, len, start, seed] = b.block_params(entry)[..] else { unreachable!("five parameters") };
        let mut at = Vec::new();
        let mut bases = Vec::new();
        for i in 0..inner.len() {
            let base = b.ins().load(types::I64, mem(), bases_p, 8 * i as i32);
            let off = b.ins().load(types::I64, mem(), offs_p, 8 * i as i32);
            let bytes = b.ins().ishl_imm_u(off, 2);
            at.push(b.ins().iadd(base, bytes));
            bases.push(base);
        }
        let mut hoisted = vec![None; k.body.len()];
        for (i, x) in k.body.iter().enumerate() {
            let scalar = match *x {
                Expr::Const { value } => Some(b.ins().f32const(value as f32)),
                Expr::Element { arg, index } => {
                    let p = b.ins().iadd_imm_s(bases[arg], 4 * index as i64);
                    Some(b.ins().load(types::F32, mem(), p, 0))
                }
                Expr::Load { arg } if inner[arg] == 0 => Some(b.ins().load(types::F32, mem(), at[arg], 0)),
                _ => None,
            };
            hoisted[i] = scalar.map(|s| (s, b.ins().splat(F32X4, s)));
        }
        // Stages, and which values need a chunk array.
        let mut stage = vec![0usize; k.body.len()];
        for (i, e) in k.body.iter().enumerate() {
            let latest = e.operands().iter().map(|&o| stage[o]).max().unwrap_or(0);
            stage[i] = latest + usize::from(is_call(e));
        }
        let mut needs = vec![false; k.body.len()];
        for (i, e) in k.body.iter().enumerate() {
            for o in e.operands() {
                if is_call(e) || hoisted[o].is_none() && stage[o] < stage[i] {
                    needs[o] = true;
                }
            }
            needs[i] |= is_call(e);
        }
        let array = needs
            .iter()
            .map(|&n| {
                n.then(|| {
                    b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 4 * CHUNK as u32, 4))
                })
            })
            .collect();
        let mut e = Emit { b, k, inner, call_conv, at, hoisted, stage, array };
        // for c in (0..len).step_by(CHUNK)
        let zero = e.b.ins().iconst(types::I64, 0);
        e.counted(zero, len, CHUNK as i64, |e, c| {
            let left = e.b.ins().isub(len, c);
            let chunk = e.b.ins().iconst(types::I64, CHUNK as i64);
            let n = e.b.ins().umin(left, chunk);
            let last = e.stage.iter().copied().max().unwrap_or(0);
            for s in 0..=last {
                if s > 0 {
                    e.calls(s, n, c, start, seed);
                }
                e.stage_loop(s, c, n);
            }
        });
        e.b.ins().return_(&[]);
        e.b.seal_all_blocks();
    }

    /// `for (j = from; j < bound; j += step) body(j)`, unsigned; code after
    /// it goes on from the loop's exit, which returns `j` as it left.
    fn counted(&mut self, from: Value, bound: Value, step: i64, body: impl FnOnce(&mut Self, Value)) -> Value {
        let [head, inside, exit] = [(); 3].map(|_| self.b.create_block());
        for blk in [head, inside, exit] {
            self.b.append_block_param(blk, types::I64);
        }
        self.b.ins().jump(head, &[BlockArg::from(from)]);
        self.b.switch_to_block(head);
        let j = self.b.block_params(head)[0];
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, j, bound);
        self.b.ins().brif(more, inside, &[BlockArg::from(j)], exit, &[BlockArg::from(j)]);
        self.b.switch_to_block(inside);
        let j = self.b.block_params(inside)[0];
        body(self, j);
        let next = self.b.ins().iadd_imm_s(j, step);
        self.b.ins().jump(head, &[BlockArg::from(next)]);
        self.b.switch_to_block(exit);
        self.b.block_params(exit)[0]
    }

    /// The calls that start stage `s`, over the chunk's `n` values.
    fn calls(&mut self, s: usize, n: Value, c: Value, start: Value, seed: Value) {
        let ptr = types::I64;
        for (i, e) in self.k.body.iter().enumerate() {
            if self.stage[i] != s || !is_call(e) {
                continue;
            }
            let addr = |me: &mut Self, v: usize| {
                let slot = me.array[v].expect("a call's operands and result have arrays");
                me.b.ins().stack_addr(ptr, slot, 0)
            };
            let o = addr(self, i);
            let (f, params, args): (usize, Vec<Type>, Vec<Value>) = match *e {
                Expr::Unary { op, x } => {
                    let op = self.b.ins().iconst(types::I32, unary_index(op));
                    let x = addr(self, x);
                    (call_unary as *const () as usize, vec![types::I32, ptr, ptr, ptr], vec![op, x, o, n])
                }
                Expr::UnaryGrad { op, x, g } => {
                    let op = self.b.ins().iconst(types::I32, unary_index(op));
                    let (x, g) = (addr(self, x), addr(self, g));
                    (call_unary_grad as *const () as usize, vec![types::I32, ptr, ptr, ptr, ptr], vec![op, x, g, o, n])
                }
                Expr::Pow { x, exp } => {
                    let x = addr(self, x);
                    let e = self.b.ins().f32const(exp as f32);
                    (call_pow as *const () as usize, vec![ptr, ptr, ptr, types::F32], vec![x, o, n, e])
                }
                Expr::Round { x, dtype } => {
                    let x = addr(self, x);
                    let d = self.b.ins().iconst(types::I32, i64::from(dtype == DType::F16));
                    (call_round as *const () as usize, vec![ptr, ptr, ptr, types::I32], vec![x, o, n, d])
                }
                Expr::Dropout { x, p, rng } => {
                    let x = addr(self, x);
                    let rng = self.b.ins().iconst(types::I64, rng as i64);
                    let at = self.b.ins().iadd(start, c);
                    let p = self.b.ins().f64const(p);
                    (
                        call_dropout as *const () as usize,
                        vec![ptr, ptr, ptr, types::I64, types::I64, types::I64, types::F64],
                        vec![x, o, n, seed, rng, at, p],
                    )
                }
                Expr::Index => {
                    let at = self.b.ins().iadd(start, c);
                    let row = self.k.dims.last().map_or(1, |d| d.size as i64);
                    let row = self.b.ins().iconst(types::I64, row);
                    (call_index as *const () as usize, vec![ptr, ptr, types::I64, types::I64], vec![o, n, at, row])
                }
                Expr::Equal { a, b } => {
                    let (a, b) = (addr(self, a), addr(self, b));
                    (call_equal as *const () as usize, vec![ptr, ptr, ptr, ptr], vec![a, b, o, n])
                }
                _ => unreachable!("only calls"),
            };
            let mut sig = Signature::new(self.call_conv);
            sig.params.extend(params.into_iter().map(AbiParam::new));
            let sig = self.b.import_signature(sig);
            let callee = self.b.ins().iconst(ptr, f as i64);
            self.b.ins().call_indirect(sig, callee, &args);
        }
    }

    /// Stage `s`'s loop over the chunk at segment position `c`, `n`
    /// positions: four at a time while four remain (where every argument's
    /// inner stride is 0 or 1), then one at a time.
    fn stage_loop(&mut self, s: usize, c: Value, n: Value) {
        let mut j = self.b.ins().iconst(types::I64, 0);
        if self.inner.iter().all(|&st| st <= 1) {
            // Eight positions per iteration (two vectors, independent), then four.
            let eights = self.b.ins().band_imm_s(n, !7i64);
            j = self.counted(j, eights, 8, |e, j| {
                e.positions(s, c, j, true);
                let j4 = e.b.ins().iadd_imm_s(j, 4);
                e.positions(s, c, j4, true);
            });
            let whole = self.b.ins().band_imm_s(n, !3i64);
            j = self.counted(j, whole, 4, |e, j| e.positions(s, c, j, true));
        }
        self.counted(j, n, 1, |e, j| e.positions(s, c, j, false));
    }

    /// Stage `s`'s work at chunk position `j` of the chunk at `c` (four
    /// positions when `lanes`): compute its values, keep those that need
    /// arrays, and store the kernel's outputs computed in this stage.
    fn positions(&mut self, s: usize, c: Value, j: Value, lanes: bool) {
        let ty = if lanes { F32X4 } else { types::F32 };
        // Byte offset of position j in a chunk array, and of position c + j in an argument's stride units.
        let in_chunk = self.b.ins().ishl_imm_u(j, 2);
        let pos = self.b.ins().iadd(c, j);
        let mut v: Vec<Option<Value>> = vec![None; self.k.body.len()];
        for (i, x) in self.k.body.iter().enumerate() {
            if let Some((sc, vec)) = self.hoisted[i] {
                v[i] = Some(if lanes { vec } else { sc });
                continue;
            }
            if self.stage[i] != s || is_call(x) {
                // Computed earlier (read from its array where used) or by a call.
                continue;
            }
            let get = |me: &mut Self, o: usize| -> Value { me.value(&v, o, ty, in_chunk) };
            let value = match *x {
                Expr::Load { arg } => {
                    let p = self.address(arg, pos);
                    self.b.ins().load(ty, mem(), p, 0)
                }
                Expr::Unary { op, x } => {
                    let x = get(self, x);
                    match op {
                        UnaryOp::Neg => self.b.ins().fneg(x),
                        UnaryOp::Abs => self.b.ins().fabs(x),
                        UnaryOp::Sqrt => self.b.ins().sqrt(x),
                        UnaryOp::Square => self.b.ins().fmul(x, x),
                        other => unreachable!("`{}` is a call", other.name()),
                    }
                }
                Expr::Binary { op, a, b } => {
                    let (a, b) = (get(self, a), get(self, b));
                    match op {
                        BinaryOp::Add => self.b.ins().fadd(a, b),
                        BinaryOp::Sub => self.b.ins().fsub(a, b),
                        BinaryOp::Mul => self.b.ins().fmul(a, b),
                        BinaryOp::Div => self.b.ins().fdiv(a, b),
                    }
                }
                _ => unreachable!("hoisted, or a call"),
            };
            v[i] = Some(value);
        }
        // Keep what later stages and calls read.
        for (i, val) in v.iter().enumerate() {
            if let (Some(slot), Some(val)) = (self.array[i], *val)
                && !is_call(&self.k.body[i])
                && (self.stage[i] == s && self.hoisted[i].is_none() || self.hoisted[i].is_some() && s == 0)
            {
                let p = self.in_array(slot, in_chunk);
                self.b.ins().store(mem(), val, p, 0);
            }
        }
        for &(arg, value) in &self.k.stores {
            let here = if self.hoisted[value].is_some() { s == 0 } else { self.stage[value] == s };
            if !here {
                continue;
            }
            let mut val = self.value(&v, value, ty, in_chunk);
            // A per-row output (stride 0 along the row) takes one lane: the value is the same along the row.
            if lanes && self.inner[arg] == 0 {
                val = self.b.ins().extractlane(val, 0);
            }
            let p = self.address(arg, pos);
            self.b.ins().store(mem(), val, p, 0);
        }
    }

    /// Body value `o` at this position: computed in this stage (`v`), or
    /// read from its chunk array at byte offset `in_chunk`.
    fn value(&mut self, v: &[Option<Value>], o: usize, ty: Type, in_chunk: Value) -> Value {
        match v[o] {
            Some(val) => val,
            None => {
                let slot = self.array[o].expect("a value from an earlier stage or a call has an array");
                let p = self.in_array(slot, in_chunk);
                self.b.ins().load(ty, mem(), p, 0)
            }
        }
    }

    /// The address of byte offset `in_chunk` in a chunk array.
    fn in_array(&mut self, slot: cranelift_codegen::ir::StackSlot, in_chunk: Value) -> Value {
        let base = self.b.ins().stack_addr(types::I64, slot, 0);
        self.b.ins().iadd(base, in_chunk)
    }

    /// Argument `arg`'s address at segment position `pos`.
    fn address(&mut self, arg: usize, pos: Value) -> Value {
        let by = self.b.ins().imul_imm_s(pos, 4 * self.inner[arg] as i64);
        self.b.ins().iadd(self.at[arg], by)
    }
}

fn unary_index(op: UnaryOp) -> i64 {
    UNARY.iter().position(|&u| u == op).expect("every unary op is numbered") as i64
}
