using System.Globalization;

namespace LocalVllm.Engine.Text.Templating;

/// <summary>Parses the Jinja2 subset that chat templates use into a tree; anything else is an error with its position.</summary>
internal sealed class JinjaParser
{
    private readonly List<Token> _tokens;
    private int _pos;

    private JinjaParser(List<Token> tokens) => _tokens = tokens;

    public static List<Node> Parse(string source)
    {
        // As jinja2: newlines in the source become \n, and one final newline is dropped (keep_trailing_newline=False).
        source = source.Replace("\r\n", "\n", StringComparison.Ordinal).Replace('\r', '\n');
        if (source.EndsWith('\n')) source = source[..^1];
        var parser = new JinjaParser(JinjaLexer.Tokenize(source));
        var body = parser.ParseBody(out var end);
        if (end is not null) throw parser.Error(parser.Previous, $"unexpected '{{% {end} %}}'");
        return body;
    }

    private Token Current => _tokens[_pos];
    private Token Previous => _tokens[Math.Max(0, _pos - 1)];

    private TemplateException Error(Token at, string what) =>
        new($"Chat template error at line {at.Line}, column {at.Column}: {what}.");

    private Token Advance() => _tokens[_pos++];

    private bool IsOp(string op) => Current.Kind == TokenKind.Operator && Current.Value == op;
    private bool IsName(string name) => Current.Kind == TokenKind.Name && Current.Value == name;

    private Token Expect(TokenKind kind, string? value = null)
    {
        var t = Current;
        if (t.Kind != kind || (value is not null && t.Value != value))
            throw Error(t, $"expected {(value ?? kind.ToString())} but found '{(t.Kind == TokenKind.Eof ? "end of template" : t.Value)}'");
        return Advance();
    }

    /// <summary>Parses nodes until a block tag this level does not own; returns that tag's keyword in <paramref name="endTag"/>.</summary>
    private List<Node> ParseBody(out string? endTag, params string[] terminators)
    {
        var nodes = new List<Node>();
        while (true)
        {
            var t = Current;
            switch (t.Kind)
            {
                case TokenKind.Eof:
                    endTag = null;
                    return nodes;
                case TokenKind.Text:
                    Advance();
                    nodes.Add(new TextNode(t.Value, t.Line, t.Column));
                    break;
                case TokenKind.VarBegin:
                    Advance();
                    var e = ParseExpression();
                    Expect(TokenKind.VarEnd);
                    nodes.Add(new OutputNode(e, t.Line, t.Column));
                    break;
                case TokenKind.BlockBegin:
                    var keyword = _tokens[_pos + 1];
                    if (keyword.Kind == TokenKind.Name && terminators.Contains(keyword.Value))
                    {
                        _pos += 2;
                        endTag = keyword.Value;
                        return nodes;
                    }
                    Advance();
                    nodes.Add(ParseStatement());
                    break;
                default:
                    throw Error(t, $"unexpected '{t.Value}'");
            }
        }
    }

    private Node ParseStatement()
    {
        var kw = Expect(TokenKind.Name);
        switch (kw.Value)
        {
            case "if":
            {
                var branches = new List<(Expr, List<Node>)>();
                var cond = ParseExpression();
                Expect(TokenKind.BlockEnd);
                List<Node>? elseBody = null;
                while (true)
                {
                    var body = ParseBody(out var end, "elif", "else", "endif");
                    branches.Add((cond, body));
                    if (end == "elif") { cond = ParseExpression(); Expect(TokenKind.BlockEnd); continue; }
                    if (end == "else")
                    {
                        Expect(TokenKind.BlockEnd);
                        elseBody = ParseBody(out var end2, "endif");
                        if (end2 != "endif") throw Error(kw, "'if' without 'endif'");
                    }
                    else if (end != "endif") throw Error(kw, "'if' without 'endif'");
                    Expect(TokenKind.BlockEnd);
                    return new IfNode(branches, elseBody, kw.Line, kw.Column);
                }
            }
            case "for":
            {
                var targets = new List<string> { Expect(TokenKind.Name).Value };
                while (IsOp(",")) { Advance(); targets.Add(Expect(TokenKind.Name).Value); }
                Expect(TokenKind.Name, "in");
                var iterable = ParseExpression(allowConditional: false);
                Expr? filter = null;
                if (IsName("if")) { Advance(); filter = ParseExpression(allowConditional: false); }
                bool recursive = false;
                if (IsName("recursive")) { Advance(); recursive = true; }
                Expect(TokenKind.BlockEnd);
                var body = ParseBody(out var end, "else", "endfor");
                List<Node>? elseBody = null;
                if (end == "else")
                {
                    Expect(TokenKind.BlockEnd);
                    elseBody = ParseBody(out end, "endfor");
                }
                if (end != "endfor") throw Error(kw, "'for' without 'endfor'");
                Expect(TokenKind.BlockEnd);
                return new ForNode(targets, iterable, filter, body, elseBody, kw.Line, kw.Column, recursive);
            }
            case "set":
            {
                bool parenthesized = IsOp("(");
                if (parenthesized) Advance();
                var name = Expect(TokenKind.Name).Value;
                string? attr = null;
                List<string>? targets = null;
                if (IsOp(".")) { Advance(); attr = Expect(TokenKind.Name).Value; }
                else if (IsOp(","))
                {
                    targets = [name];
                    while (IsOp(",")) { Advance(); if (Current.Kind != TokenKind.Name) break; targets.Add(Advance().Value); }
                }
                if (parenthesized) Expect(TokenKind.Operator, ")");
                if (IsOp("=") || targets is not null)
                {
                    Expect(TokenKind.Operator, "=");
                    var value = ParseTupleOrExpression();
                    Expect(TokenKind.BlockEnd);
                    return new SetNode(name, attr, value, kw.Line, kw.Column, targets);
                }
                Expect(TokenKind.BlockEnd);
                var body = ParseBody(out var end, "endset");
                if (end != "endset") throw Error(kw, "'set' block without 'endset'");
                Expect(TokenKind.BlockEnd);
                return new SetBlockNode(name, body, kw.Line, kw.Column);
            }
            case "break":
                Expect(TokenKind.BlockEnd);
                return new BreakNode(kw.Line, kw.Column);
            case "continue":
                Expect(TokenKind.BlockEnd);
                return new ContinueNode(kw.Line, kw.Column);
            case "macro":
            {
                var name = Expect(TokenKind.Name).Value;
                Expect(TokenKind.Operator, "(");
                var ps = new List<(string, Expr?)>();
                while (!IsOp(")"))
                {
                    var p = Expect(TokenKind.Name).Value;
                    Expr? d = null;
                    if (IsOp("=")) { Advance(); d = ParseExpression(); }
                    ps.Add((p, d));
                    if (IsOp(",")) Advance();
                }
                Advance();
                Expect(TokenKind.BlockEnd);
                var body = ParseBody(out var end, "endmacro");
                if (end != "endmacro") throw Error(kw, "'macro' without 'endmacro'");
                Expect(TokenKind.BlockEnd);
                return new MacroNode(name, ps, body, kw.Line, kw.Column);
            }
            case "filter":
            {
                var filters = new List<(string, List<Expr>, List<(string, Expr)>, int, int)>();
                do
                {
                    if (filters.Count > 0) Advance(); // the '|' between chained filters
                    var f = Expect(TokenKind.Name);
                    var (args, kwargs) = IsOp("(") ? ParseArgs() : ([], []);
                    filters.Add((f.Value, args, kwargs, f.Line, f.Column));
                } while (IsOp("|"));
                Expect(TokenKind.BlockEnd);
                var body = ParseBody(out var end, "endfilter");
                if (end != "endfilter") throw Error(kw, "'filter' without 'endfilter'");
                Expect(TokenKind.BlockEnd);
                return new FilterBlockNode(filters, body, kw.Line, kw.Column);
            }
            case "generation":
            {
                Expect(TokenKind.BlockEnd);
                var body = ParseBody(out var end, "endgeneration");
                if (end != "endgeneration") throw Error(kw, "'generation' without 'endgeneration'");
                Expect(TokenKind.BlockEnd);
                return new GenerationNode(body, kw.Line, kw.Column);
            }
            default:
                throw Error(kw, $"unsupported statement '{{% {kw.Value} %}}'");
        }
    }

    private Expr ParseTupleOrExpression()
    {
        var first = ParseExpression();
        if (!IsOp(",")) return first;
        var items = new List<Expr> { first };
        while (IsOp(",")) { Advance(); if (Current.Kind == TokenKind.BlockEnd) break; items.Add(ParseExpression()); }
        return new ListExpr(items, first.Line, first.Column, IsTuple: true);
    }

    public Expr ParseExpression(bool allowConditional = true)
    {
        var e = ParseOr();
        if (allowConditional && IsName("if"))
        {
            var t = Advance();
            var cond = ParseOr();
            Expr? otherwise = null;
            if (IsName("else")) { Advance(); otherwise = ParseExpression(); }
            return new CondExpr(cond, e, otherwise, t.Line, t.Column);
        }
        return e;
    }

    private Expr ParseOr()
    {
        var left = ParseAnd();
        while (IsName("or")) { var t = Advance(); left = new BinaryExpr("or", left, ParseAnd(), t.Line, t.Column); }
        return left;
    }

    private Expr ParseAnd()
    {
        var left = ParseNot();
        while (IsName("and")) { var t = Advance(); left = new BinaryExpr("and", left, ParseNot(), t.Line, t.Column); }
        return left;
    }

    private Expr ParseNot()
    {
        if (IsName("not")) { var t = Advance(); return new UnaryExpr("not", ParseNot(), t.Line, t.Column); }
        return ParseCompare();
    }

    private static readonly string[] CompareOps = ["==", "!=", "<", ">", "<=", ">="];

    private Expr ParseCompare()
    {
        var left = ParseConcat();
        while (true)
        {
            var t = Current;
            if (t.Kind == TokenKind.Operator && CompareOps.Contains(t.Value)) { Advance(); left = new BinaryExpr(t.Value, left, ParseConcat(), t.Line, t.Column); }
            else if (IsName("in")) { Advance(); left = new BinaryExpr("in", left, ParseConcat(), t.Line, t.Column); }
            else if (IsName("not") && _tokens[_pos + 1].Kind == TokenKind.Name && _tokens[_pos + 1].Value == "in")
            {
                _pos += 2;
                left = new BinaryExpr("not in", left, ParseConcat(), t.Line, t.Column);
            }
            else return left;
        }
    }

    private Expr ParseConcat()
    {
        var left = ParseAdd();
        while (IsOp("~")) { var t = Advance(); left = new BinaryExpr("~", left, ParseAdd(), t.Line, t.Column); }
        return left;
    }

    private Expr ParseAdd()
    {
        var left = ParseMul();
        while (IsOp("+") || IsOp("-")) { var t = Advance(); left = new BinaryExpr(t.Value, left, ParseMul(), t.Line, t.Column); }
        return left;
    }

    private Expr ParseMul()
    {
        var left = ParsePow();
        while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) { var t = Advance(); left = new BinaryExpr(t.Value, left, ParsePow(), t.Line, t.Column); }
        return left;
    }

    /// <summary><c>**</c>, left-associative and binding looser than unary minus, as jinja2 parses it (<c>-2 ** 2</c> is 4).</summary>
    private Expr ParsePow()
    {
        var left = ParseUnary();
        while (IsOp("**")) { var t = Advance(); left = new BinaryExpr("**", left, ParseUnary(), t.Line, t.Column); }
        return left;
    }

    /// <summary>
    /// A unary expression; as in jinja2, the filters and tests after it apply to the whole of it, sign included
    /// (<c>-3|abs</c> is 3).
    /// </summary>
    private Expr ParseUnary(bool withFilters = true)
    {
        Expr e;
        if (IsOp("-") || IsOp("+")) { var t = Advance(); e = ParsePostfix(new UnaryExpr(t.Value, ParseUnary(withFilters: false), t.Line, t.Column)); }
        else e = ParsePostfix(ParsePrimary());
        if (!withFilters) return e;
        while (true)
        {
            if (IsOp("|"))
            {
                Advance();
                var t = Expect(TokenKind.Name); // errors about a filter point at its name
                var (args, kwargs) = IsOp("(") ? ParseArgs() : ([], []);
                e = ParsePostfix(new FilterExpr(e, t.Value, args, kwargs, t.Line, t.Column));
            }
            else if (IsName("is"))
            {
                var t = Advance();
                bool negated = false;
                if (IsName("not")) { Advance(); negated = true; }
                var name = Advance();
                if (name.Kind != TokenKind.Name) throw Error(name, "expected a test name after 'is'");
                var args = new List<Expr>();
                if (IsOp("(")) args = ParseArgs().Args;
                else if (Current.Kind is TokenKind.String or TokenKind.Integer or TokenKind.Float || (Current.Kind == TokenKind.Name && !IsName("and") && !IsName("or") && !IsName("if") && !IsName("else") && !IsName("is") && !IsName("in") && !IsName("not")))
                    args.Add(ParsePostfix(ParsePrimary()));
                e = new TestExpr(e, name.Value, args, negated, t.Line, t.Column);
            }
            else return e;
        }
    }

    private (List<Expr> Args, List<(string, Expr)> Kwargs) ParseArgs()
    {
        Expect(TokenKind.Operator, "(");
        var args = new List<Expr>();
        var kwargs = new List<(string, Expr)>();
        while (!IsOp(")"))
        {
            if (Current.Kind == TokenKind.Name && _tokens[_pos + 1] is { Kind: TokenKind.Operator, Value: "=" })
            {
                var name = Advance().Value;
                Advance();
                kwargs.Add((name, ParseExpression()));
            }
            else args.Add(ParseExpression());
            if (!IsOp(")")) Expect(TokenKind.Operator, ",");
        }
        Advance();
        return (args, kwargs);
    }

    private Expr ParsePostfix(Expr e)
    {
        while (true)
        {
            if (IsOp("."))
            {
                var t = Advance();
                var name = Advance();
                if (name.Kind is not (TokenKind.Name or TokenKind.Integer)) throw Error(name, "expected an attribute name after '.'");
                e = new AttrExpr(e, name.Value, t.Line, t.Column);
            }
            else if (IsOp("["))
            {
                var t = Advance();
                Expr? start = null, stop = null, step = null;
                bool slice = false;
                if (!IsOp(":")) start = ParseExpression();
                if (IsOp(":"))
                {
                    slice = true;
                    Advance();
                    if (!IsOp(":") && !IsOp("]")) stop = ParseExpression();
                    if (IsOp(":")) { Advance(); if (!IsOp("]")) step = ParseExpression(); }
                }
                Expect(TokenKind.Operator, "]");
                e = slice ? new SliceExpr(e, start, stop, step, t.Line, t.Column) : new IndexExpr(e, start!, t.Line, t.Column);
            }
            else if (IsOp("("))
            {
                var t = Current;
                var (args, kwargs) = ParseArgs();
                e = new CallExpr(e, args, kwargs, t.Line, t.Column);
            }
            else return e;
        }
    }

    private Expr ParsePrimary()
    {
        var t = Advance();
        switch (t.Kind)
        {
            case TokenKind.String:
            {
                var s = t.Value;
                while (Current.Kind == TokenKind.String) s += Advance().Value; // adjacent literals concatenate
                return new Literal(s, t.Line, t.Column);
            }
            case TokenKind.Integer:
                return new Literal(long.Parse(t.Value, CultureInfo.InvariantCulture), t.Line, t.Column);
            case TokenKind.Float:
                return new Literal(double.Parse(t.Value, CultureInfo.InvariantCulture), t.Line, t.Column);
            case TokenKind.Name:
                return t.Value switch
                {
                    "true" or "True" => new Literal(true, t.Line, t.Column),
                    "false" or "False" => new Literal(false, t.Line, t.Column),
                    "none" or "None" => new Literal(null, t.Line, t.Column),
                    _ => new NameExpr(t.Value, t.Line, t.Column),
                };
            case TokenKind.Operator when t.Value == "(":
            {
                if (IsOp(")")) { Advance(); return new ListExpr([], t.Line, t.Column, IsTuple: true); }
                var e = ParseExpression();
                if (IsOp(","))
                {
                    var items = new List<Expr> { e };
                    while (IsOp(",")) { Advance(); if (IsOp(")")) break; items.Add(ParseExpression()); }
                    e = new ListExpr(items, t.Line, t.Column, IsTuple: true);
                }
                Expect(TokenKind.Operator, ")");
                return e;
            }
            case TokenKind.Operator when t.Value == "[":
            {
                var items = new List<Expr>();
                while (!IsOp("]")) { items.Add(ParseExpression()); if (!IsOp("]")) Expect(TokenKind.Operator, ","); }
                Advance();
                return new ListExpr(items, t.Line, t.Column);
            }
            case TokenKind.Operator when t.Value == "{":
            {
                var items = new List<(Expr, Expr)>();
                while (!IsOp("}"))
                {
                    var k = ParseExpression();
                    Expect(TokenKind.Operator, ":");
                    items.Add((k, ParseExpression()));
                    if (!IsOp("}")) Expect(TokenKind.Operator, ",");
                }
                Advance();
                return new DictExpr(items, t.Line, t.Column);
            }
            default:
                throw Error(t, $"unexpected '{(t.Kind == TokenKind.Eof ? "end of template" : t.Value)}' in an expression");
        }
    }
}
