//! Integer division made safe to serve: ONNX Runtime's CPU kernels for `Div` and `Mod` on
//! int32/int64 check for a zero divisor but not for the one other case the processor traps
//! on — the type's minimum divided by −1 — which kills the whole process with SIGFPE. A model
//! that divides integers computed from a request's values (positions, lengths, indices) lets
//! any client crash the daemon with two numbers.
//!
//! [`guard_division`] rewrites every such node so that a divisor of −1 never reaches the
//! kernel: `m = (b == −1)`, the node divides by `Where(m, −b, b)`, and `Div`'s result is
//! `Where(m, −a, a / b')` — what the division means in two's complement (the minimum divided
//! by −1 wraps to itself, as in NumPy); `Mod` needs no second `Where` (anything mod ±1 is 0).
//! `m` is computed without a typed constant (`b == Sign(b)` and `b < b − b`), so the same
//! nodes serve whatever type the divisor has; for float divisors they give the same bits as
//! the plain node. Every other value gives exactly the result the original node gives.
//!
//! A node is left alone when its type is known not to be int32/int64 (floats, where ORT's
//! fusions should still see a plain `Div`, and the narrow and unsigned types, which do not
//! trap), or when either operand is a one-element constant that rules the case out (a
//! divisor other than −1, a dividend other than the minimum: `x / 2` in shape arithmetic).
//! Types come from the graph's declarations and a forward pass over ONNX's type rules
//! ([`output_types`]); an operand whose type is not known is guarded. Subgraphs (If, Loop,
//! Scan bodies) are guarded too, with the types of the names they read from outer scopes,
//! and so are model-local functions' bodies (their inputs untyped, at their own opset).
//!
//! The same trap waits in `STFT`: its kernel divides by its `frame_length` input unchecked,
//! so a frame length of 0 computed from a request kills the process (SIGFPE; found by running
//! ORT's kernels over extreme values of every input that is read as a number — the only
//! other trap found). Unless it is a non-zero constant, `frame_length` goes through
//! `l · (l / l)` first: equal to it for every other value, and ORT's clean "integer division
//! by zero" error for 0.
//!
//! A run past its limit is stopped through ORT's terminate flag, which ORT checks before each
//! node it runs, in a `Loop`'s body too. A body that runs no node of its own — none, or only
//! nodes ORT folds into constants because none reads the body's inputs — never checks it, and a
//! trip count from a request would hold a worker for good. Such a body's condition output
//! becomes `And(cond, Equal(i, i))` (true and-ed in: the same value), which reads the
//! iteration number and so runs every iteration.

use std::collections::{HashMap, HashSet};

use crate::onnx::{self, Model, graph, node, tensor, value_info};
use crate::proto::{Error, Message, Value};

/// What [`guard_division`] did to a model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Guarded {
    /// The `Div`/`Mod` nodes now guarded (any graph depth).
    pub guarded: usize,
    /// The `STFT` nodes whose `frame_length` is now checked for 0.
    pub frames: usize,
    /// The `Loop` bodies given a node that runs every iteration (a stop point).
    pub loops: usize,
    /// Integer (or untyped) `Div`/`Mod` nodes left as they are, with why: the model's
    /// opset is older than the guard's operators (opset 9: `Sign`, `Where` and integer
    /// `Less`; 11: `Equal` on floats too, for nodes whose type is not known).
    pub unguarded: Option<String>,
}

impl std::fmt::Display for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} integer Div/Mod node{} guarded against MIN / -1",
            self.guarded,
            if self.guarded == 1 { "" } else { "s" }
        )?;
        if self.frames > 0 {
            write!(f, ", {} STFT frame_length checked for 0", self.frames)?;
        }
        if self.loops > 0 {
            write!(f, ", {} Loop bodies given a stop point", self.loops)?;
        }
        if let Some(why) = &self.unguarded {
            write!(f, "; not guarded: {why}")?;
        }
        Ok(())
    }
}

/// The least default-domain opset with the guard's operators for int32/int64 divisors.
const MIN_OPSET_TYPED: u64 = 9;
/// The least with them for every numeric type (`Equal` on floats): untyped divisors.
const MIN_OPSET: u64 = 11;

/// `bytes` with every integer `Div`/`Mod` node guarded (module docs); `None` when no node
/// needed it (the model serves as it is), with what was found.
pub fn guard_division(bytes: &[u8]) -> Result<(Option<Vec<u8>>, Guarded), Error> {
    // Every model a daemon loads comes here: it is looked at in outline (no copy of its
    // weights), and parsed whole only when a node needs the guard.
    let outline = Model::parse_outline(bytes)?;
    let in_functions = outline
        .msg
        .messages(FUNCTIONS)?
        .iter()
        .any(|f| has_trap(&function_graph(f).unwrap_or_default()).unwrap_or(true));
    if !has_trap(&outline.graph)? && !in_functions {
        return Ok((None, Guarded::default()));
    }
    let (changed, found, _) = guard_model(outline)?;
    if !changed {
        return Ok((None, found));
    }
    let (_, _, guarded) = guard_model(Model::parse(bytes)?)?;
    Ok((Some(guarded.encode()), found))
}

/// [`guard_division`] on a parsed model: whether it changed, what was found, and the model.
fn guard_model(mut model: Model) -> Result<(bool, Guarded, Model), Error> {
    let mut names = HashSet::new();
    collect_names(&model.graph, &mut names)?;
    let opset = model.opset("").unwrap_or(0);
    let mut g = Guard {
        names,
        next: 0,
        count: 0,
        frames: 0,
        loops: 0,
        left: 0,
        opset,
    };
    let mut changed = g.graph(&mut model.graph, &HashMap::new())?;
    // Model-local functions: their inputs are untyped (guarded unless a constant rules the
    // case out), at the function's own opset.
    let mut functions = model.msg.messages(FUNCTIONS)?;
    let mut functions_changed = false;
    for f in &mut functions {
        let mut body = function_graph(f)?;
        collect_names(&body, &mut g.names)?;
        g.opset = function_opset(f)?.unwrap_or(opset);
        if g.graph(&mut body, &HashMap::new())? {
            f.replace(
                FUNCTION_NODE,
                body.messages(graph::NODE)?
                    .iter()
                    .map(|n| Value::Bytes(n.encode()))
                    .collect(),
            );
            functions_changed = true;
        }
    }
    if functions_changed {
        model.msg.replace(
            FUNCTIONS,
            functions.iter().map(|f| Value::Bytes(f.encode())).collect(),
        );
        changed = true;
    }
    let mut out = Guarded {
        guarded: g.count,
        frames: g.frames,
        loops: g.loops,
        unguarded: None,
    };
    if g.left > 0 {
        out.unguarded = Some(format!(
            "{} node{} (opset {opset}; the guard needs {MIN_OPSET_TYPED}, or {MIN_OPSET} \
             where the type is not known)",
            g.left,
            if g.left == 1 { "" } else { "s" }
        ));
    }
    Ok((changed, out, model))
}

/// ModelProto.functions; FunctionProto.node and .opset_import.
const FUNCTIONS: u32 = 25;
const FUNCTION_NODE: u32 = 7;
const FUNCTION_OPSET: u32 = 9;

/// A function's body as a graph of its nodes (what [`Guard::graph`] walks).
fn function_graph(f: &Message) -> Result<Message, Error> {
    let mut g = Message::default();
    for n in f.messages(FUNCTION_NODE)? {
        g.push_message(graph::NODE, &n);
    }
    Ok(g)
}

/// The default domain's version a function imports, if it says.
fn function_opset(f: &Message) -> Result<Option<u64>, Error> {
    Ok(f.messages(FUNCTION_OPSET)?
        .into_iter()
        .find(|o| matches!(o.string(onnx::opset::DOMAIN).as_str(), "" | "ai.onnx"))
        .and_then(|o| o.varint(onnx::opset::VERSION)))
}

/// Whether any node of `g` or its subgraphs is a default-domain `Div`, `Mod` or `STFT` with
/// a `frame_length`.
fn has_trap(g: &Message) -> Result<bool, Error> {
    let nodes = g.messages(graph::NODE)?;
    let nested = onnx::nested_nodes(&nodes)?;
    Ok(nodes
        .iter()
        .chain(&nested)
        .any(|n| is_division(n) || frame_length(n).is_some() || is_loop(n)))
}

fn is_loop(n: &Message) -> bool {
    default_domain(n) && onnx::op_type(n) == "Loop"
}

/// The names of `g`'s inputs.
fn input_names(g: &Message) -> Result<HashSet<String>, Error> {
    Ok(g.messages(graph::INPUT)?
        .iter()
        .map(|v| v.string(value_info::NAME))
        .collect())
}

/// Whether a `Loop` body has no node that reads its inputs (the iteration number, the
/// condition, the carried values): every node it has reads constants or values fixed for the
/// whole loop, which ORT may fold or hoist, and it may never check the terminate flag. A node
/// with subgraphs counts as reading them (what runs in it is not looked into).
fn runs_nothing(body: &Message) -> Result<bool, Error> {
    let inputs = input_names(body)?;
    for n in body.messages(graph::NODE)? {
        // A node reading none of them reads constants (and outer values, fixed for the loop).
        if onnx::has_subgraph(&n)? || onnx::inputs(&n).iter().any(|x| inputs.contains(x)) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn default_domain(n: &Message) -> bool {
    let domain = n.string(node::DOMAIN);
    domain.is_empty() || domain == "ai.onnx"
}

fn is_division(n: &Message) -> bool {
    default_domain(n)
        && matches!(onnx::op_type(n).as_str(), "Div" | "Mod")
        && onnx::inputs(n).len() == 2
        && onnx::outputs(n).len() == 1
}

/// An `STFT` node's `frame_length` input (its fourth), when it has one.
fn frame_length(n: &Message) -> Option<String> {
    if !default_domain(n) || onnx::op_type(n) != "STFT" {
        return None;
    }
    onnx::inputs(n).get(3).filter(|l| !l.is_empty()).cloned()
}

/// Every name `g` and its subgraphs define or read: new names must differ from all of them.
fn collect_names(g: &Message, names: &mut HashSet<String>) -> Result<(), Error> {
    for t in g.messages(graph::INITIALIZER)? {
        names.insert(onnx::name_of(&t));
    }
    for field in [graph::INPUT, graph::OUTPUT, VALUE_INFO] {
        for v in g.messages(field)? {
            names.insert(v.string(value_info::NAME));
        }
    }
    for n in g.messages(graph::NODE)? {
        names.extend(onnx::inputs(&n));
        names.extend(onnx::outputs(&n));
        for a in n.messages(node::ATTRIBUTE)? {
            for field in [onnx::attr::G, onnx::attr::GRAPHS] {
                for sub in a.messages(field)? {
                    collect_names(&sub, names)?;
                }
            }
        }
    }
    Ok(())
}

/// GraphProto.value_info: declared types of intermediate values.
const VALUE_INFO: u32 = 13;

struct Guard {
    names: HashSet<String>,
    next: usize,
    count: usize,
    /// `STFT` nodes whose `frame_length` is checked.
    frames: usize,
    /// `Loop` bodies given a stop point.
    loops: usize,
    /// Nodes that needed a guard the model's opset has no operators for.
    left: usize,
    opset: u64,
}

/// A one-element integer constant's value, by name: initializers (unless a graph input of
/// the same name can override them) and `Constant` nodes.
type Consts = HashMap<String, i64>;

impl Guard {
    fn fresh(&mut self, base: &str) -> String {
        loop {
            let n = format!("{base}/rxd_guard_{}", self.next);
            self.next += 1;
            if self.names.insert(n.clone()) {
                return n;
            }
        }
    }

    /// Guards the division nodes of `g` (and its subgraphs), `outer`: the types of the names
    /// it may read from enclosing graphs. True when anything changed.
    fn graph(&mut self, g: &mut Message, outer: &HashMap<String, u64>) -> Result<bool, Error> {
        let mut types = outer.clone();
        let mut consts = Consts::new();
        let inputs = input_names(g)?;
        for t in g.messages(graph::INITIALIZER)? {
            let name = onnx::name_of(&t);
            if let Some(ty) = t.varint(tensor::DATA_TYPE) {
                types.insert(name.clone(), ty);
            }
            if !inputs.contains(&name)
                && let Some(v) = onnx::int_scalar(&t)?
            {
                consts.insert(name, v);
            }
        }
        // Declared types: ONNX Runtime checks them against its own inference, so they hold.
        let mut declared = HashMap::new();
        for field in [graph::INPUT, graph::OUTPUT, VALUE_INFO] {
            for v in g.messages(field)? {
                if let Some(ty) = onnx::elem_type(&v) {
                    declared.insert(v.string(value_info::NAME), ty);
                }
            }
        }
        for (k, v) in &declared {
            types.insert(k.clone(), *v);
        }
        let mut nodes = g.messages(graph::NODE)?;
        let mut out = Vec::with_capacity(nodes.len());
        let mut changed = false;
        for mut n in nodes.drain(..) {
            if onnx::has_subgraph(&n)? {
                let scope = types.clone();
                changed |= onnx::map_subgraphs(&mut n, &mut |sub| self.graph(sub, &scope))?;
            }
            if is_loop(&n) {
                changed |= onnx::map_subgraphs(&mut n, &mut |body| self.stop_point(body))?;
            }
            let outs = onnx::outputs(&n);
            for (o, t) in outs.iter().zip(output_types(&n, &types)?) {
                match (declared.get(o), t) {
                    (Some(&d), _) => {
                        types.insert(o.clone(), d);
                    }
                    (None, Some(t)) => {
                        types.insert(o.clone(), t);
                    }
                    (None, None) => {
                        types.remove(o);
                    }
                }
            }
            if onnx::op_type(&n) == "Constant"
                && let Some(o) = outs.first()
            {
                let v = match onnx::tensor_attr(&n, "value")? {
                    Some(t) => onnx::int_scalar(&t)?,
                    None => onnx::int_attr(&n, "value_int")?,
                };
                if let Some(v) = v {
                    consts.insert(o.clone(), v);
                }
            }
            if let Some(typed) = is_division(&n)
                .then(|| needs_guard(&n, &types, &consts))
                .flatten()
            {
                let min = if typed { MIN_OPSET_TYPED } else { MIN_OPSET };
                if self.opset >= min {
                    out.extend(self.rewrite(n));
                    self.count += 1;
                    changed = true;
                    continue;
                }
                self.left += 1;
            }
            if let Some(l) = frame_length(&n)
                && consts.get(&l).is_none_or(|&v| v == 0)
            {
                out.extend(self.check_frame_length(n, &l));
                self.frames += 1;
                changed = true;
                continue;
            }
            out.push(n);
        }
        if changed {
            g.replace(
                graph::NODE,
                out.iter().map(|n| Value::Bytes(n.encode())).collect(),
            );
        }
        Ok(changed)
    }
}

/// Whether division node `n` can trap, and if so whether its type is known (int32/int64:
/// `Some(true)`) or not (`Some(false)`); `None`: it cannot.
fn needs_guard(n: &Message, types: &HashMap<String, u64>, consts: &Consts) -> Option<bool> {
    let ins = onnx::inputs(n);
    let (a, b) = (&ins[0], &ins[1]);
    // Both operands of Div/Mod have one type: either's tells.
    let ty = types.get(a).or_else(|| types.get(b)).copied();
    let min = match ty {
        Some(tensor::INT32) => i64::from(i32::MIN),
        Some(tensor::INT64) | None => i64::MIN,
        Some(_) => return None,
    };
    // A constant operand that rules the one trapping pair out (for an untyped node,
    // a divisor other than −1 or a dividend that is neither minimum).
    if consts.get(b).is_some_and(|&d| d != -1) {
        return None;
    }
    if let Some(&x) = consts.get(a) {
        let could_trap = x == min || (ty.is_none() && x == i64::from(i32::MIN));
        if !could_trap {
            return None;
        }
    }
    Some(ty.is_some())
}

impl Guard {
    /// The nodes that replace division node `n` (module docs).
    fn rewrite(&mut self, n: Message) -> Vec<Message> {
        let ins = onnx::inputs(&n);
        let (a, b) = (ins[0].as_str(), ins[1].as_str());
        let y = onnx::outputs(&n).remove(0);
        let base = if y.is_empty() { "div" } else { y.as_str() };
        let [sign, same, zero, below, m, neg_b, safe_b] = [
            "sign",
            "same",
            "zero",
            "below",
            "minus_one",
            "neg_b",
            "safe_b",
        ]
        .map(|s| self.fresh(&format!("{base}/{s}")));
        let node =
            |op: &str, ins: &[&str], out: &str| onnx::make_node(op, "", "", ins, &[out], &[]);
        let mut nodes = vec![
            node("Sign", &[b], &sign),
            node("Equal", &[b, &sign], &same),
            node("Sub", &[b, b], &zero),
            node("Less", &[b, &zero], &below),
            node("And", &[&same, &below], &m),
            node("Neg", &[b], &neg_b),
            node("Where", &[&m, &neg_b, b], &safe_b),
        ];
        let mut div = n;
        onnx::set_inputs(&mut div, [a.to_string(), safe_b]);
        if onnx::op_type(&div) == "Mod" {
            // a mod ±1 is 0 (fmod: ±0 with a's sign, the same for either divisor).
            nodes.push(div);
            return nodes;
        }
        let (q, neg_a) = (
            self.fresh(&format!("{base}/q")),
            self.fresh(&format!("{base}/neg_a")),
        );
        div.replace(node::OUTPUT, vec![Value::Bytes(q.clone().into_bytes())]);
        nodes.push(div);
        nodes.push(node("Neg", &[a], &neg_a));
        nodes.push(node("Where", &[&m, &neg_a, &q], &y));
        nodes
    }
}

impl Guard {
    /// Gives `body` (a `Loop`'s) a node that runs every iteration when it has none (module
    /// docs); true when it did.
    fn stop_point(&mut self, body: &mut Message) -> Result<bool, Error> {
        if !runs_nothing(body)? {
            return Ok(false);
        }
        let ins = body.messages(graph::INPUT)?;
        let mut outs = body.messages(graph::OUTPUT)?;
        let (Some(i), Some(cond)) = (ins.first(), outs.first_mut()) else {
            return Ok(false);
        };
        let (i, c) = (i.string(value_info::NAME), cond.string(value_info::NAME));
        let [same, checked] = ["iteration", "cond"].map(|s| self.fresh(&format!("loop/{s}")));
        let node =
            |op: &str, ins: &[&str], out: &str| onnx::make_node(op, "", "", ins, &[out], &[]);
        body.push_message(graph::NODE, &node("Equal", &[&i, &i], &same));
        body.push_message(graph::NODE, &node("And", &[&c, &same], &checked));
        cond.replace(
            value_info::NAME,
            vec![Value::Bytes(checked.clone().into_bytes())],
        );
        body.replace(
            graph::OUTPUT,
            outs.iter().map(|o| Value::Bytes(o.encode())).collect(),
        );
        self.loops += 1;
        Ok(true)
    }

    /// `STFT` node `n` with its frame length `l` replaced by `l · (l / l)` (module docs).
    fn check_frame_length(&mut self, mut n: Message, l: &str) -> Vec<Message> {
        let base = onnx::outputs(&n).first().cloned().unwrap_or_default();
        let base = if base.is_empty() { "stft" } else { &base };
        let [one, checked] = ["one", "frame_length"].map(|s| self.fresh(&format!("{base}/{s}")));
        let node =
            |op: &str, ins: &[&str], out: &str| onnx::make_node(op, "", "", ins, &[out], &[]);
        let mut ins = onnx::inputs(&n);
        ins[3] = checked.clone();
        onnx::set_inputs(&mut n, ins);
        vec![
            node("Div", &[l, l], &one),
            node("Mul", &[l, &one], &checked),
            n,
        ]
    }
}

/// ONNX operators whose outputs have types other than their first input's, by output:
/// `Some(t)` fixed, `None` not known from the inputs alone (the value is treated as untyped).
fn output_types(n: &Message, types: &HashMap<String, u64>) -> Result<Vec<Option<u64>>, Error> {
    use tensor::{BOOL, FLOAT, INT32, INT64, UINT8};
    let ins = onnx::inputs(n);
    let outs = onnx::outputs(n);
    let of = |i: usize| ins.get(i).and_then(|x| types.get(x)).copied();
    let all = |t: Option<u64>| vec![t; outs.len()];
    let first_then = |rest: Option<u64>| {
        let mut v = vec![rest; outs.len()];
        if let Some(f) = v.first_mut() {
            *f = of(0);
        }
        v
    };
    let domain = n.string(node::DOMAIN);
    if !(domain.is_empty() || domain == "ai.onnx") {
        return Ok(all(None));
    }
    let dtype_attr = |default: Option<u64>| -> Result<Option<u64>, Error> {
        Ok(onnx::int_attr(n, "dtype")?.map(|t| t as u64).or(default))
    };
    Ok(match onnx::op_type(n).as_str() {
        "Constant" => all(onnx::constant_type(n, FLOAT)?),
        "Cast" => all(onnx::int_attr(n, "to")?.map(|t| t as u64)),
        "CastLike" => all(of(1)),
        "ConstantOfShape" => all(Some(
            onnx::tensor_attr(n, "value")?
                .and_then(|t| t.varint(tensor::DATA_TYPE))
                .unwrap_or(FLOAT),
        )),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression"
        | "SequenceLength" => all(Some(INT64)),
        "TopK" | "MaxPool" => first_then(Some(INT64)),
        "Unique" => first_then(Some(INT64)),
        "Dropout" => first_then(Some(BOOL)),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
        | "Xor" | "IsNaN" | "IsInf" | "RegexFullMatch" => all(Some(BOOL)),
        "MatMulInteger" | "ConvInteger" => all(Some(INT32)),
        "QuantizeLinear" => all(Some(of(2).unwrap_or(UINT8))),
        "DynamicQuantizeLinear" => vec![Some(UINT8), Some(FLOAT), Some(UINT8)],
        "QLinearConv" => all(of(7)),
        "QLinearMatMul" => all(of(7)),
        "DequantizeLinear" => all(of(1)),
        "Where" => all(of(1).or(of(2))),
        "OneHot" => all(of(2)),
        "Multinomial" => all(dtype_attr(Some(INT32))?),
        "RandomNormal" | "RandomUniform" | "Bernoulli" => all(dtype_attr(Some(FLOAT))?),
        "RandomNormalLike" | "RandomUniformLike" | "EyeLike" => all(dtype_attr(of(0))?),
        "HannWindow" | "HammingWindow" | "BlackmanWindow" | "MelWeightMatrix" => {
            all(onnx::int_attr(n, "output_datatype")?
                .map(|t| t as u64)
                .or(Some(FLOAT)))
        }
        "ImageDecoder" => all(Some(UINT8)),
        "TfIdfVectorizer" => all(Some(FLOAT)),
        // Control flow, sequences, optionals, strings: not followed (untyped unless declared).
        "If" | "Loop" | "Scan" | "SequenceAt" | "SequenceConstruct" | "SequenceEmpty"
        | "SequenceErase" | "SequenceInsert" | "SequenceMap" | "SplitToSequence"
        | "ConcatFromSequence" | "Optional" | "OptionalGetElement" | "OptionalHasElement"
        | "StringNormalizer" | "StringConcat" | "StringSplit" => all(None),
        // Everything else: the type of its first typed input (elementwise arithmetic, shape
        // and layout operators, reductions, convolutions, normalizations, Range, Gather…).
        _ => all(ins.iter().find_map(|x| types.get(x)).copied()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vi(name: &str, ty: u64) -> Message {
        onnx::value_info(name, ty, &[])
    }

    /// `y = op(a, b)`, both inputs of type `ty`.
    fn binary(op_type: &str, ty: u64, opset: u64) -> Vec<u8> {
        model(
            &[op(op_type, &["a", "b"], "y")],
            &[("a", ty), ("b", ty)],
            &[],
            opset,
        )
    }

    fn model(nodes: &[Message], inputs: &[(&str, u64)], inits: &[Message], opset: u64) -> Vec<u8> {
        let mut g = Message::default();
        for n in nodes {
            g.push_message(graph::NODE, n);
        }
        for t in inits {
            g.push_message(graph::INITIALIZER, t);
        }
        for (name, ty) in inputs {
            g.push_message(graph::INPUT, &vi(name, *ty));
        }
        let mut m = Message::default();
        m.push(onnx::model::IR_VERSION, Value::Varint(8));
        let mut o = Message::default();
        o.push_str(onnx::opset::DOMAIN, "");
        o.push(onnx::opset::VERSION, Value::Varint(opset));
        m.push_message(onnx::model::OPSET_IMPORT, &o);
        m.push_message(onnx::model::GRAPH, &g);
        m.encode()
    }

    fn op(op: &str, ins: &[&str], out: &str) -> Message {
        onnx::make_node(op, "", "", ins, &[out], &[])
    }

    fn ops_of(bytes: &[u8]) -> Vec<String> {
        let m = Model::parse(bytes).unwrap();
        m.graph
            .messages(graph::NODE)
            .unwrap()
            .iter()
            .map(onnx::op_type)
            .collect()
    }

    fn scalar(name: &str, ty: u64, v: i64) -> Message {
        let raw = match ty {
            tensor::INT32 => (v as i32).to_le_bytes().to_vec(),
            _ => v.to_le_bytes().to_vec(),
        };
        onnx::make_tensor(name, &[], ty, raw)
    }

    #[test]
    fn integer_division_of_inputs_is_guarded_and_keeps_its_output_name() {
        for ty in [tensor::INT32, tensor::INT64] {
            let bytes = binary("Div", ty, 17);
            let (out, g) = guard_division(&bytes).unwrap();
            let out = out.expect("rewritten");
            assert_eq!(g.guarded, 1);
            assert_eq!(g.unguarded, None);
            let m = Model::parse(&out).unwrap();
            let nodes = m.graph.messages(graph::NODE).unwrap();
            let last = nodes.last().unwrap();
            assert_eq!(onnx::op_type(last), "Where");
            assert_eq!(onnx::outputs(last), vec!["y".to_string()]);
            let div = nodes.iter().find(|n| onnx::op_type(n) == "Div").unwrap();
            assert_eq!(onnx::inputs(div)[0], "a");
            assert_ne!(onnx::inputs(div)[1], "b", "the divisor is replaced");
            // Every name is defined once.
            let mut seen = HashSet::new();
            for n in &nodes {
                for o in onnx::outputs(n) {
                    assert!(seen.insert(o.clone()), "{o} defined twice");
                }
            }
        }
    }

    #[test]
    fn mod_divides_by_the_safe_divisor_and_needs_no_second_where() {
        let bytes = binary("Mod", tensor::INT64, 17);
        let out = guard_division(&bytes).unwrap().0.unwrap();
        let ops = ops_of(&out);
        assert_eq!(ops.last().map(String::as_str), Some("Mod"));
        assert_eq!(ops.iter().filter(|o| *o == "Where").count(), 1);
    }

    #[test]
    fn float_narrow_and_unsigned_divisions_are_left_alone() {
        for ty in [
            tensor::FLOAT,
            tensor::FLOAT16,
            tensor::INT8,
            tensor::INT16,
            tensor::UINT32,
            tensor::UINT64,
        ] {
            let bytes = binary("Div", ty, 17);
            let (out, g) = guard_division(&bytes).unwrap();
            assert!(out.is_none(), "type {ty}");
            assert_eq!(g.guarded, 0);
        }
        // Typed through the graph: Shape gives int64, Cast to float gives float.
        let bytes = model(
            &[
                op("Shape", &["x"], "s"),
                op("Div", &["s", "s"], "q"),
                onnx::make_node("Cast", "", "", &["s"], &["f"], &[("to", 1)]),
                op("Div", &["f", "f"], "r"),
            ],
            &[("x", tensor::FLOAT)],
            &[],
            17,
        );
        let (out, g) = guard_division(&bytes).unwrap();
        assert!(out.is_some());
        assert_eq!(g.guarded, 1, "the int64 Div, not the float one");
    }

    #[test]
    fn an_stft_frame_length_that_may_be_zero_is_checked() {
        let stft = |ins: &[&str]| op("STFT", ins, "y");
        let inputs = [
            ("x", tensor::FLOAT),
            ("st", tensor::INT64),
            ("l", tensor::INT64),
        ];
        // From the request: l · (l / l) feeds the STFT.
        let bytes = model(&[stft(&["x", "st", "", "l"])], &inputs, &[], 17);
        let (out, g) = guard_division(&bytes).unwrap();
        assert_eq!((g.frames, g.guarded), (1, 0));
        let m = Model::parse(&out.expect("rewritten")).unwrap();
        let nodes = m.graph.messages(graph::NODE).unwrap();
        let ops: Vec<String> = nodes.iter().map(onnx::op_type).collect();
        assert_eq!(ops, ["Div", "Mul", "STFT"]);
        assert_eq!(onnx::inputs(&nodes[0]), ["l", "l"]);
        assert_eq!(onnx::inputs(&nodes[1])[0], "l");
        assert_eq!(onnx::inputs(&nodes[2])[3], onnx::outputs(&nodes[1])[0]);
        assert_eq!(onnx::inputs(&nodes[2])[..3], ["x", "st", ""]);
        // A constant: left alone unless it is 0; none at all: nothing to check.
        let with = |l: i64| {
            let b = model(
                &[stft(&["x", "st", "", "k"])],
                &inputs[..2],
                &[scalar("k", tensor::INT64, l)],
                17,
            );
            guard_division(&b).unwrap().1.frames
        };
        assert_eq!(with(16), 0);
        assert_eq!(with(0), 1);
        let none = model(&[stft(&["x", "st", "w"])], &inputs[..2], &[], 17);
        assert_eq!(guard_division(&none).unwrap(), (None, Guarded::default()));
    }

    #[test]
    fn a_loop_body_that_runs_no_node_gets_a_stop_point() {
        let body = |nodes: &[Message], cond: &str, v: &str| {
            let mut b = Message::default();
            for n in nodes {
                b.push_message(graph::NODE, n);
            }
            for (name, ty) in [
                ("i", tensor::INT64),
                ("c", tensor::BOOL),
                ("v", tensor::FLOAT),
            ] {
                b.push_message(graph::INPUT, &vi(name, ty));
            }
            b.push_message(graph::OUTPUT, &vi(cond, tensor::BOOL));
            b.push_message(graph::OUTPUT, &vi(v, tensor::FLOAT));
            b
        };
        let with_body = |b: &Message| {
            let mut lp = op("Loop", &["m", "", "x"], "y");
            let mut a = Message::default();
            a.push_str(onnx::attr::NAME, "body");
            a.push_message(onnx::attr::G, b);
            a.push(onnx::attr::TYPE, Value::Varint(5));
            lp.push_message(node::ATTRIBUTE, &a);
            model(
                &[lp],
                &[("m", tensor::INT64), ("x", tensor::FLOAT)],
                &[],
                17,
            )
        };
        let loops = |b: &Message| guard_division(&with_body(b)).unwrap().1.loops;
        // No node; only nodes of constants (ORT folds them): stop points.
        assert_eq!(loops(&body(&[], "c", "v")), 1);
        let constant = onnx::make_node("Constant", "", "", &[], &["k"], &[]);
        let folded = [constant, op("Not", &["k"], "nk")];
        assert_eq!(loops(&body(&folded, "nk", "v")), 1);
        // A node reading the body's inputs runs every iteration: left alone.
        assert_eq!(loops(&body(&[op("Identity", &["c"], "c2")], "c2", "v")), 0);
        assert_eq!(loops(&body(&[op("Add", &["v", "v"], "w")], "c", "w")), 0);
        // The rewritten body: cond_out = And(c, Equal(i, i)).
        let (out, _) = guard_division(&with_body(&body(&[], "c", "v"))).unwrap();
        let m = Model::parse(&out.expect("rewritten")).unwrap();
        let lp = &m.graph.messages(graph::NODE).unwrap()[0];
        let b = lp.messages(node::ATTRIBUTE).unwrap()[0]
            .message(onnx::attr::G)
            .unwrap()
            .unwrap();
        let nodes = b.messages(graph::NODE).unwrap();
        let ops: Vec<String> = nodes.iter().map(onnx::op_type).collect();
        assert_eq!(ops, ["Equal", "And"]);
        assert_eq!(onnx::inputs(&nodes[0]), ["i", "i"]);
        assert_eq!(onnx::inputs(&nodes[1])[0], "c");
        let outs = b.messages(graph::OUTPUT).unwrap();
        assert_eq!(
            outs[0].string(value_info::NAME),
            onnx::outputs(&nodes[1])[0]
        );
        assert_eq!(outs[1].string(value_info::NAME), "v");
    }

    #[test]
    fn a_constant_operand_that_rules_the_trap_out_needs_no_guard() {
        let run = |div_by: i64, dividend: Option<i64>| {
            let mut inits = vec![scalar("c", tensor::INT64, div_by)];
            let a = match dividend {
                Some(v) => {
                    inits.push(scalar("k", tensor::INT64, v));
                    "k"
                }
                None => "a",
            };
            let bytes = model(
                &[op("Div", &[a, "c"], "y"), op("Div", &["a", "y"], "z")],
                &[("a", tensor::INT64)],
                &inits,
                17,
            );
            guard_division(&bytes).unwrap().1.guarded
        };
        // y = a / 2 is safe; z = a / y is not (y may be -1).
        assert_eq!(run(2, None), 1);
        assert_eq!(run(-1, None), 2, "a divisor of -1 can trap");
        assert_eq!(run(-1, Some(5)), 1, "5 / -1 cannot");
        assert_eq!(run(-1, Some(i64::MIN)), 2);
    }

    #[test]
    fn an_initializer_a_client_can_override_is_not_a_constant() {
        let bytes = model(
            &[op("Div", &["a", "c"], "y")],
            &[("a", tensor::INT64), ("c", tensor::INT64)],
            &[scalar("c", tensor::INT64, 2)],
            17,
        );
        assert_eq!(guard_division(&bytes).unwrap().1.guarded, 1);
    }

    #[test]
    fn untyped_divisions_are_guarded() {
        // A custom-domain op's output has no known type.
        let custom = onnx::make_node("Mystery", "com.example", "", &["x"], &["u"], &[]);
        let bytes = model(
            &[custom, op("Div", &["u", "u"], "y")],
            &[("x", tensor::FLOAT)],
            &[],
            17,
        );
        assert_eq!(guard_division(&bytes).unwrap().1.guarded, 1);
    }

    #[test]
    fn subgraphs_are_guarded_with_outer_types() {
        let mut body = Message::default();
        body.push_message(graph::NODE, &op("Div", &["a", "b"], "q"));
        body.push_message(graph::OUTPUT, &vi("q", tensor::INT64));
        let mut other = Message::default();
        other.push_message(graph::NODE, &op("Identity", &["a"], "q2"));
        other.push_message(graph::OUTPUT, &vi("q2", tensor::INT64));
        let mut iff = op("If", &["c"], "y");
        for (name, g) in [("then_branch", &body), ("else_branch", &other)] {
            let mut a = Message::default();
            a.push_str(onnx::attr::NAME, name);
            a.push_message(onnx::attr::G, g);
            a.push(onnx::attr::TYPE, Value::Varint(5));
            iff.push_message(node::ATTRIBUTE, &a);
        }
        let bytes = model(
            &[iff],
            &[
                ("a", tensor::INT64),
                ("b", tensor::INT64),
                ("c", tensor::BOOL),
            ],
            &[],
            17,
        );
        let (out, g) = guard_division(&bytes).unwrap();
        assert_eq!(g.guarded, 1);
        let m = Model::parse(&out.unwrap()).unwrap();
        let inner = onnx::nested_nodes(&m.graph.messages(graph::NODE).unwrap()).unwrap();
        assert!(inner.iter().any(|n| onnx::op_type(n) == "Sign"));
        assert_eq!(
            inner.iter().filter(|n| onnx::op_type(n) == "Div").count(),
            1
        );
    }

    #[test]
    fn an_old_opset_guards_what_its_operators_allow_and_reports_the_rest() {
        let custom = onnx::make_node("Mystery", "com.example", "", &["x"], &["u"], &[]);
        let nodes = [
            op("Div", &["a", "b"], "y"),
            custom,
            op("Div", &["u", "u"], "z"),
        ];
        let inputs = [
            ("a", tensor::INT64),
            ("b", tensor::INT64),
            ("x", tensor::FLOAT),
        ];
        // Opset 10: the typed node is guarded, the untyped one is not (no float Equal).
        let (out, g) = guard_division(&model(&nodes, &inputs, &[], 10)).unwrap();
        assert!(out.is_some());
        assert_eq!(g.guarded, 1);
        assert!(g.unguarded.unwrap().starts_with("1 node (opset 10"));
        // Opset 8: neither.
        let (out, g) = guard_division(&model(&nodes, &inputs, &[], 8)).unwrap();
        assert!(out.is_none());
        assert_eq!(g.guarded, 0);
        assert!(g.unguarded.unwrap().starts_with("2 nodes (opset 8"));
    }

    #[test]
    fn the_outline_leaves_weights_out_and_keeps_what_the_guard_reads() {
        let weights = onnx::make_tensor("w", &[1 << 18], tensor::FLOAT, vec![0; 1 << 20]);
        let nodes = [
            op("MatMul", &["x", "w"], "m"),
            op("Div", &["a", "two"], "h"),
            op("Div", &["a", "h"], "y"),
        ];
        let bytes = model(
            &nodes,
            &[("x", tensor::FLOAT), ("a", tensor::INT64)],
            &[weights, scalar("two", tensor::INT64, 2)],
            17,
        );
        let outline = Model::parse_outline(&bytes).unwrap();
        assert!(outline.encode().len() < 1024, "{}", outline.encode().len());
        assert_eq!(
            onnx::int_scalar(&outline.graph.messages(graph::INITIALIZER).unwrap()[1]).unwrap(),
            Some(2)
        );
        let (out, g) = guard_division(&bytes).unwrap();
        assert_eq!(g.guarded, 1, "a / 2 needs none, a / h does");
        let whole = Model::parse(&out.unwrap()).unwrap();
        let w = &whole.graph.messages(graph::INITIALIZER).unwrap()[0];
        assert_eq!(
            w.bytes(tensor::RAW_DATA).map(<[u8]>::len),
            Some(1 << 20),
            "weights kept"
        );
    }

    #[test]
    fn a_model_local_functions_division_is_guarded_at_its_opset() {
        for (fn_opset, want) in [(17, 1), (10, 0)] {
            let mut f = Message::default();
            f.push_str(1, "f"); // FunctionProto.name
            f.push_str(4, "x");
            f.push_str(4, "y");
            f.push_str(5, "z");
            f.push_message(FUNCTION_NODE, &op("Div", &["x", "y"], "z"));
            let mut o = Message::default();
            o.push_str(onnx::opset::DOMAIN, "");
            o.push(onnx::opset::VERSION, Value::Varint(fn_opset));
            f.push_message(FUNCTION_OPSET, &o);
            f.push_str(10, "local"); // FunctionProto.domain
            let call = onnx::make_node("f", "local", "", &["a", "b"], &["y"], &[]);
            let bytes = model(
                &[call],
                &[("a", tensor::INT64), ("b", tensor::INT64)],
                &[],
                17,
            );
            let mut m = Message::parse(&bytes).unwrap();
            m.push_message(FUNCTIONS, &f);
            let (out, g) = guard_division(&m.encode()).unwrap();
            assert_eq!(g.guarded, want, "function opset {fn_opset}");
            assert_eq!(g.unguarded.is_some(), want == 0);
            if want == 0 {
                continue;
            }
            let out = Message::parse(&out.unwrap()).unwrap();
            let f = &out.messages(FUNCTIONS).unwrap()[0];
            let ops: Vec<String> = f
                .messages(FUNCTION_NODE)
                .unwrap()
                .iter()
                .map(onnx::op_type)
                .collect();
            assert!(ops.contains(&"Sign".to_string()), "{ops:?}");
            assert_eq!(ops.last().map(String::as_str), Some("Where"));
        }
    }

    #[test]
    fn a_model_without_division_is_untouched() {
        let bytes = model(
            &[op("Add", &["a", "a"], "y")],
            &[("a", tensor::INT64)],
            &[],
            17,
        );
        assert_eq!(guard_division(&bytes).unwrap(), (None, Guarded::default()));
    }
}
