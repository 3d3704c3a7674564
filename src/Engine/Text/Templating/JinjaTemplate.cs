using System.Globalization;
using System.Text;

namespace LocalVllm.Engine.Text.Templating;

/// <summary>
/// A parsed Jinja2 template, rendered with jinja2's semantics for the subset chat templates use (see
/// <see cref="JinjaParser"/> for the grammar). Immutable and safe to render from several threads.
/// </summary>
public sealed class JinjaTemplate
{
    private readonly List<Node> _body;

    /// <summary>Parses <paramref name="source"/>; an unsupported construct throws <see cref="TemplateException"/> with line and column.</summary>
    public JinjaTemplate(string source)
    {
        ArgumentNullException.ThrowIfNull(source);
        _body = JinjaParser.Parse(source);
    }

    /// <summary>Renders with <paramref name="context"/> (values as produced by <see cref="JinjaValues.FromJson"/> or plain CLR lists/dictionaries).</summary>
    public string Render(IReadOnlyDictionary<string, object?> context) => Render(context, DateTime.Now);

    /// <summary>Renders with <paramref name="now"/> as the time <c>strftime_now</c> formats (local time, as Python's datetime.now()).</summary>
    internal string Render(IReadOnlyDictionary<string, object?> context, DateTime now)
    {
        var renderer = new Renderer(context, now);
        var sb = new StringBuilder();
        renderer.Execute(_body, sb);
        return sb.ToString();
    }

    private enum Flow { Normal, Break, Continue }

    private sealed record BoundMethod(object? Target, string Name);
    private sealed record Macro(MacroNode Node);
    /// <summary><c>loop.cycle(a, b, ...)</c> of the loop iteration <see cref="Index"/>.</summary>
    private sealed record LoopCycle(int Index);
    /// <summary>The <c>loop</c> of a <c>recursive</c> for loop, called as <c>loop(children)</c>: the body again, one level deeper.</summary>
    private sealed record RecursiveLoop(ForNode Node, int Depth);

    private sealed class Renderer
    {
        private List<Dictionary<string, object?>> _scopes;
        private readonly DateTime _now;

        public Renderer(IReadOnlyDictionary<string, object?> context, DateTime now)
        {
            _scopes = [new Dictionary<string, object?>(context)];
            _now = now;
        }

        private object? Lookup(string name)
        {
            for (int i = _scopes.Count - 1; i >= 0; i--)
                if (_scopes[i].TryGetValue(name, out var v)) return v;
            return name switch
            {
                "raise_exception" or "namespace" or "range" or "dict" or "strftime_now" => new BoundMethod(null, name),
                _ => Undefined.Because($"'{name}' is undefined"),
            };
        }

        public Flow Execute(List<Node> nodes, StringBuilder output)
        {
            foreach (var node in nodes)
            {
                var flow = Execute(node, output);
                if (flow != Flow.Normal) return flow;
            }
            return Flow.Normal;
        }

        private Flow Execute(Node node, StringBuilder output)
        {
            switch (node)
            {
                case TextNode t:
                    output.Append(t.Text);
                    return Flow.Normal;
                case OutputNode o:
                    output.Append(JinjaValues.Str(Eval(o.Value)));
                    return Flow.Normal;
                case GenerationNode g:
                    return Execute(g.Body, output);
                case FilterBlockNode fb:
                {
                    var inner = new StringBuilder();
                    var flow = Execute(fb.Body, inner);
                    object? value = inner.ToString();
                    foreach (var (name, args, kwargs, line, column) in fb.Filters)
                        value = Plain(JinjaFilters.Apply(name, value, args.Select(Eval).ToList(), kwargs.ToDictionary(k => k.Name, k => Eval(k.Value)), new TextNode("", line, column)));
                    output.Append(JinjaValues.Str(value));
                    return flow;
                }
                case IfNode f:
                    foreach (var (cond, body) in f.Branches)
                        if (JinjaValues.Truthy(Eval(cond))) return Execute(body, output);
                    return f.Else is null ? Flow.Normal : Execute(f.Else, output);
                case ForNode f:
                    return ExecuteFor(f, Eval(f.Iterable), 1, output);
                case SetNode s:
                {
                    var value = Eval(s.Value);
                    if (s.Targets is { } targets)
                    {
                        var parts = value as List<object?> ?? (value is string str ? JinjaValues.CodePoints(str).Select(p => (object?)p).ToList() : null)
                            ?? throw Error(s, $"cannot unpack {JinjaValues.Repr(value)} into {targets.Count} names");
                        if (parts.Count != targets.Count) throw Error(s, $"cannot unpack {parts.Count} values into {targets.Count} names");
                        for (int i = 0; i < targets.Count; i++) _scopes[^1][targets[i]] = parts[i];
                    }
                    else if (s.Attribute is null) _scopes[^1][s.Name] = value;
                    else if (Lookup(s.Name) is Namespace ns) ns.Values[s.Attribute] = value;
                    else throw Error(s, $"cannot set attribute '{s.Attribute}' of '{s.Name}', which is not a namespace()");
                    return Flow.Normal;
                }
                case SetBlockNode sb:
                {
                    var inner = new StringBuilder();
                    Execute(sb.Body, inner);
                    _scopes[^1][sb.Name] = inner.ToString();
                    return Flow.Normal;
                }
                case MacroNode m:
                    _scopes[^1][m.Name] = new Macro(m);
                    return Flow.Normal;
                case BreakNode:
                    return Flow.Break;
                case ContinueNode:
                    return Flow.Continue;
                default:
                    throw Error(node, $"unsupported node {node.GetType().Name}");
            }
        }

        private Flow ExecuteFor(ForNode f, object? iterable, int depth, StringBuilder output)
        {
            var items = Iterate(iterable, f).ToList();
            if (f.Filter is not null)
            {
                items = items.Where(item =>
                {
                    _scopes.Add([]);
                    Bind(f, item);
                    bool keep = JinjaValues.Truthy(Eval(f.Filter));
                    _scopes.RemoveAt(_scopes.Count - 1);
                    return keep;
                }).ToList();
            }
            if (items.Count == 0)
                return f.Else is null ? Flow.Normal : Execute(f.Else, output);
            for (int i = 0; i < items.Count; i++)
            {
                var scope = new Dictionary<string, object?>
                {
                    ["loop"] = new Dictionary<string, object?>
                    {
                        ["index0"] = (long)i, ["index"] = (long)(i + 1), ["first"] = i == 0, ["last"] = i == items.Count - 1,
                        ["length"] = (long)items.Count, ["revindex"] = (long)(items.Count - i), ["revindex0"] = (long)(items.Count - i - 1),
                        ["previtem"] = i > 0 ? items[i - 1] : Undefined.Instance,
                        ["nextitem"] = i + 1 < items.Count ? items[i + 1] : Undefined.Instance,
                        ["cycle"] = new LoopCycle(i),
                        ["depth"] = (long)depth, ["depth0"] = (long)(depth - 1),
                        ["__call__"] = f.Recursive ? new RecursiveLoop(f, depth) : null,
                    },
                };
                _scopes.Add(scope);
                Bind(f, items[i]);
                var flow = Execute(f.Body, output);
                _scopes.RemoveAt(_scopes.Count - 1);
                if (flow == Flow.Break) break;
            }
            return Flow.Normal;
        }

        private void Bind(ForNode f, object? item)
        {
            if (f.Targets.Count == 1) { _scopes[^1][f.Targets[0]] = item; return; }
            var parts = item as List<object?> ?? throw Error(f, $"cannot unpack {JinjaValues.Str(item)} into {f.Targets.Count} names");
            if (parts.Count != f.Targets.Count) throw Error(f, $"cannot unpack {parts.Count} values into {f.Targets.Count} names");
            for (int i = 0; i < parts.Count; i++) _scopes[^1][f.Targets[i]] = parts[i];
        }

        private IEnumerable<object?> Iterate(object? value, Node at) => value switch
        {
            List<object?> list => list,
            Dictionary<string, object?> dict => dict.Keys,
            string s => JinjaValues.CodePoints(s),
            Undefined => [],
            _ => throw Error(at, $"'{JinjaValues.PyType(value)}' object is not iterable"),
        };

        private static TemplateException Error(Node at, string what) =>
            new($"Chat template error at line {at.Line}, column {at.Column}: {what}.");

        /// <summary>An expression's value; a safe string (<see cref="SafeString"/>) is its plain text outside a <c>+</c>.</summary>
        public object? Eval(Expr e) => Plain(EvalRaw(e));

        private static object? Plain(object? v) => v is SafeString safe ? safe.Value : v;

        private object? EvalRaw(Expr e)
        {
            switch (e)
            {
                case Literal l: return l.Value;
                case NameExpr n: return Lookup(n.Name);
                case ListExpr l: return l.IsTuple ? new JinjaTuple(l.Items.Select(Eval)) : l.Items.Select(Eval).ToList();
                case DictExpr d:
                {
                    var dict = new Dictionary<string, object?>();
                    foreach (var (k, v) in d.Items) dict[JinjaValues.Str(Eval(k))] = Eval(v);
                    return dict;
                }
                case AttrExpr a: return GetAttr(Defined(Eval(a.Target), a), a.Name);
                case IndexExpr i: return GetItem(Defined(Eval(i.Target), i), Eval(i.Index));
                case SliceExpr s: return Slice(Eval(s.Target), s.Start is null ? null : Eval(s.Start), s.Stop is null ? null : Eval(s.Stop), s.Step is null ? null : Eval(s.Step), s);
                case CallExpr c:
                {
                    var callee = Eval(c.Target);
                    if (callee is Undefined)
                        throw Error(c, c.Target switch
                        {
                            NameExpr n => $"'{n.Name}' is undefined",
                            AttrExpr a => $"'{a.Name}' is undefined, so it cannot be called",
                            _ => "an undefined value is called",
                        });
                    return Call(callee, c.Args.Select(Eval).ToList(), c.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value)), c);
                }
                case FilterExpr f:
                    return JinjaFilters.Apply(f.Name, Eval(f.Target), f.Args.Select(Eval).ToList(), f.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value)), f);
                case TestExpr t:
                    return JinjaFilters.Test(t.Name, Eval(t.Target), t.Args.Select(Eval).ToList(), t) != t.Negated;
                case UnaryExpr u:
                {
                    var v = Eval(u.Operand);
                    return u.Op switch
                    {
                        "not" => !JinjaValues.Truthy(v),
                        "-" => v is long l ? (object)(-l) : -JinjaValues.ToDouble(v),
                        _ => v,
                    };
                }
                case CondExpr c:
                    return JinjaValues.Truthy(Eval(c.Condition)) ? Eval(c.Then) : c.Else is null ? Undefined.Instance : Eval(c.Else);
                case BinaryExpr b:
                    if (b.Op == "and") { var l = Eval(b.Left); return JinjaValues.Truthy(l) ? Eval(b.Right) : l; }
                    if (b.Op == "or") { var l = Eval(b.Left); return JinjaValues.Truthy(l) ? l : Eval(b.Right); }
                    if (b.Op == "+")
                    {
                        // Markup + str (either side) escapes the plain string and stays Markup, as markupsafe does.
                        var (left, right) = (EvalRaw(b.Left), EvalRaw(b.Right));
                        if (left is SafeString || right is SafeString)
                        {
                            if (left is SafeString or string && right is SafeString or string)
                                return new SafeString(Escaped(left) + Escaped(right));
                            return Binary("+", Plain(left), Plain(right), b);
                        }
                        return Binary("+", left, right, b);
                    }
                    return Binary(b.Op, Eval(b.Left), Eval(b.Right), b);
                default:
                    throw Error(e, $"unsupported expression {e.GetType().Name}");
            }
        }

        /// <summary>As jinja2: an undefined value may be printed or tested, but reading an attribute of it is an error.</summary>
        private static object? Defined(object? v, Node at) =>
            v is Undefined u ? throw Error(at, u.Hint ?? "an undefined value has no attributes or items") : v;

        private static string Escaped(object? v) => v is SafeString safe ? safe.Value : SafeString.Escape((string)v!);

        private static object? Binary(string op, object? a, object? b, Node at)
        {
            switch (op)
            {
                case "%" when a is string format:
                    return JinjaValues.PercentFormat(format, b, at);
                case not ("==" or "!=" or "in" or "not in" or "~") when a is Undefined || b is Undefined:
                    throw Error(at, (a as Undefined ?? (Undefined)b!).Hint ?? $"an undefined value used with '{op}'");
                case "==": return JinjaValues.Equal(a, b);
                case "!=": return !JinjaValues.Equal(a, b);
                case "in": return Contains(b, a, at);
                case "not in": return !Contains(b, a, at);
                case "~": return JinjaValues.Str(a) + JinjaValues.Str(b);
                case "<" or ">" or "<=" or ">=":
                {
                    int c = a is string sa && b is string sb ? string.CompareOrdinal(sa, sb)
                        : JinjaValues.IsNumber(a) && JinjaValues.IsNumber(b) ? JinjaValues.ToDouble(a).CompareTo(JinjaValues.ToDouble(b))
                        : throw Error(at, $"cannot compare {JinjaValues.Str(a)} and {JinjaValues.Str(b)}");
                    return op switch { "<" => c < 0, ">" => c > 0, "<=" => c <= 0, _ => c >= 0 };
                }
                case "+":
                    if (a is string s1 && b is string s2) return s1 + s2;
                    if (a is List<object?> l1 && b is List<object?> l2) return l1.Concat(l2).ToList();
                    if (a is string or List<object?>)
                        throw Error(at, $"can only concatenate {JinjaValues.PyType(a)} (not \"{JinjaValues.PyType(b)}\") to {JinjaValues.PyType(a)}");
                    break;
                case "*":
                    if (a is string rs && b is long n) return string.Concat(Enumerable.Repeat(rs, (int)Math.Max(0, n)));
                    break;
            }
            if (JinjaValues.IsNumber(a) && JinjaValues.IsNumber(b))
            {
                bool ints = a is long or bool && b is long or bool;
                double x = JinjaValues.ToDouble(a), y = JinjaValues.ToDouble(b);
                return op switch
                {
                    "+" => ints ? (object)((long)x + (long)y) : x + y,
                    "-" => ints ? (object)((long)x - (long)y) : x - y,
                    "*" => ints ? (object)((long)x * (long)y) : x * y,
                    "/" => x / y,
                    "//" => ints ? (object)(long)Math.Floor(x / y) : Math.Floor(x / y),
                    "%" => ints ? (object)(long)(x - y * Math.Floor(x / y)) : x - y * Math.Floor(x / y),
                    "**" => ints && y >= 0 ? (object)(long)Math.Pow(x, y) : Math.Pow(x, y),
                    _ => throw Error(at, $"unsupported operator '{op}'"),
                };
            }
            throw Error(at, $"unsupported operand types for '{op}': {JinjaValues.Str(a)} and {JinjaValues.Str(b)}");
        }

        private static bool Contains(object? container, object? item, Node at) => container switch
        {
            string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw Error(at, "'in <string>' needs a string"),
            List<object?> list => list.Any(x => JinjaValues.Equal(x, item)),
            Dictionary<string, object?> dict => item is string k && dict.ContainsKey(k),
            null or Undefined => false,
            _ => throw Error(at, $"'in' is not supported for {JinjaValues.Str(container)}"),
        };

        private static object? GetAttr(object? target, string name)
        {
            switch (target)
            {
                case Dictionary<string, object?> d:
                    if (d.TryGetValue(name, out var v)) return v;
                    return name is "items" or "keys" or "values" or "get" ? new BoundMethod(d, name) : Undefined.Because($"'dict object' has no attribute '{name}'");
                case Namespace ns:
                    return ns.Values.TryGetValue(name, out var nv) ? nv : Undefined.Instance;
                case string s:
                    return JinjaFilters.StringMethods.Contains(name) ? new BoundMethod(s, name) : Undefined.Instance;
                case List<object?> l when long.TryParse(name, out var idx):
                    return GetItem(l, idx);
                default:
                    return Undefined.Instance;
            }
        }

        private static object? GetItem(object? target, object? key)
        {
            switch (target)
            {
                case Dictionary<string, object?> d:
                    return key is string k && d.TryGetValue(k, out var v) ? v : Undefined.Instance;
                case List<object?> l when key is long i:
                    if (i < 0) i += l.Count;
                    return i >= 0 && i < l.Count ? l[(int)i] : Undefined.Instance;
                case string s when key is long i:
                {
                    var points = JinjaValues.CodePoints(s);
                    if (i < 0) i += points.Length;
                    return i >= 0 && i < points.Length ? points[(int)i] : Undefined.Instance;
                }
                case Namespace ns when key is string nk:
                    return ns.Values.TryGetValue(nk, out var nv) ? nv : Undefined.Instance;
                default:
                    return key is string name ? GetAttr(target, name) : Undefined.Instance;
            }
        }

        private static object? Slice(object? target, object? start, object? stop, object? step, Node at)
        {
            string[]? points = target is string text ? JinjaValues.CodePoints(text) : null;
            int len = target switch { List<object?> l => l.Count, string => points!.Length, _ => throw Error(at, $"cannot slice {JinjaValues.Str(target)}") };
            long st = step is long x ? x : 1;
            if (st == 0) throw Error(at, "slice step cannot be zero");
            long Norm(object? v, long dflt)
            {
                if (v is not long i) return dflt;
                if (i < 0) i += len;
                return st > 0 ? Math.Clamp(i, 0, len) : Math.Clamp(i, -1, len - 1);
            }
            long a = Norm(start, st > 0 ? 0 : len - 1), b = Norm(stop, st > 0 ? len : -1);
            var idx = new List<int>();
            for (long i = a; st > 0 ? i < b : i > b; i += st) idx.Add((int)i);
            return points is not null ? string.Concat(idx.Select(i => points[i])) : idx.Select(i => ((List<object?>)target!)[i]).ToList();
        }

        private object? Call(object? callee, List<object?> args, Dictionary<string, object?> kwargs, Node at)
        {
            if (callee is Macro m) return CallMacro(m.Node, args, kwargs);
            if (callee is Dictionary<string, object?> loop && loop.TryGetValue("__call__", out var self) && self is RecursiveLoop recursion)
            {
                var inner = new StringBuilder();
                ExecuteFor(recursion.Node, args.Count > 0 ? args[0] : null, recursion.Depth + 1, inner);
                return inner.ToString();
            }
            if (callee is LoopCycle cycle)
                return args.Count > 0 ? args[cycle.Index % args.Count] : throw Error(at, "loop.cycle() needs at least one value");
            if (callee is not BoundMethod bm) throw Error(at, $"'{JinjaValues.Str(callee)}' is not callable");
            object? Arg(int i, object? dflt = null) => i < args.Count ? args[i] : dflt;
            switch (bm.Target, bm.Name)
            {
                case (null, "raise_exception"):
                    throw new TemplateRaisedException(JinjaValues.Str(Arg(0)));
                case (null, "namespace"):
                {
                    var ns = new Namespace();
                    if (Arg(0) is Dictionary<string, object?> init) foreach (var (k, v) in init) ns.Values[k] = v;
                    foreach (var (k, v) in kwargs) ns.Values[k] = v;
                    return ns;
                }
                case (null, "dict"):
                    return new Dictionary<string, object?>(kwargs);
                case (null, "strftime_now"):
                    return Strftime(JinjaValues.Str(Arg(0)), _now, at);
                case (null, "range"):
                {
                    long a = args.Count > 1 ? (long)Arg(0)! : 0, b = (long)(args.Count > 1 ? Arg(1)! : Arg(0)!), s = args.Count > 2 ? (long)Arg(2)! : 1;
                    var r = new List<object?>();
                    for (long i = a; s > 0 ? i < b : i > b; i += s) r.Add(i);
                    return r;
                }
                case (Dictionary<string, object?> d, "items"):
                    return d.Select(kv => (object?)new JinjaTuple { kv.Key, kv.Value }).ToList();
                case (Dictionary<string, object?> d, "keys"):
                    return d.Keys.Select(k => (object?)k).ToList();
                case (Dictionary<string, object?> d, "values"):
                    return d.Values.ToList();
                case (Dictionary<string, object?> d, "get"):
                    return Arg(0) is string key && d.TryGetValue(key, out var gv) ? gv : Arg(1);
                case (string s, _):
                    return JinjaFilters.StringMethod(s, bm.Name, args, at);
                default:
                    throw Error(at, $"unsupported method '{bm.Name}'");
            }
        }

        private string CallMacro(MacroNode m, List<object?> args, Dictionary<string, object?> kwargs)
        {
            var scope = new Dictionary<string, object?>();
            for (int i = 0; i < m.Parameters.Count; i++)
            {
                var (name, dflt) = m.Parameters[i];
                scope[name] = i < args.Count ? args[i] : kwargs.TryGetValue(name, out var kv) ? kv : dflt is null ? Undefined.Instance : Eval(dflt);
            }
            // As in jinja2, a macro sees the template's top-level names and its arguments, not the caller's loop variables.
            var callers = _scopes;
            _scopes = [callers[0], scope];
            try
            {
                var sb = new StringBuilder();
                Execute(m.Body, sb);
                return sb.ToString();
            }
            finally
            {
                _scopes = callers;
            }
        }

        /// <summary>Python's <c>strftime</c> with the C locale's names (what transformers' <c>strftime_now</c> returns).</summary>
        private static string Strftime(string format, DateTime t, Node at)
        {
            var inv = CultureInfo.InvariantCulture;
            var sb = new StringBuilder();
            for (int i = 0; i < format.Length; i++)
            {
                if (format[i] != '%' || i + 1 >= format.Length) { sb.Append(format[i]); continue; }
                char d = format[++i];
                sb.Append(d switch
                {
                    'd' => t.Day.ToString("00", inv),
                    'e' => t.Day.ToString(inv).PadLeft(2),
                    'm' => t.Month.ToString("00", inv),
                    'Y' => t.Year.ToString("0000", inv),
                    'y' => (t.Year % 100).ToString("00", inv),
                    'H' => t.Hour.ToString("00", inv),
                    'I' => (t.Hour % 12 == 0 ? 12 : t.Hour % 12).ToString("00", inv),
                    'M' => t.Minute.ToString("00", inv),
                    'S' => t.Second.ToString("00", inv),
                    'p' => t.Hour < 12 ? "AM" : "PM",
                    'b' or 'h' => t.ToString("MMM", inv),
                    'B' => t.ToString("MMMM", inv),
                    'a' => t.ToString("ddd", inv),
                    'A' => t.ToString("dddd", inv),
                    'j' => t.DayOfYear.ToString("000", inv),
                    'w' => ((int)t.DayOfWeek).ToString(inv),
                    'F' => t.ToString("yyyy-MM-dd", inv),
                    'T' => t.ToString("HH:mm:ss", inv),
                    'D' => t.ToString("MM/dd/yy", inv),
                    '%' => "%",
                    _ => throw Error(at, $"strftime_now: unsupported directive '%{d}'"),
                });
            }
            return sb.ToString();
        }
    }
}
