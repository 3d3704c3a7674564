using System.Globalization;
using System.Text;
using System.Text.Json;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// Parses a grammar in GBNF, llama.cpp's notation, into a <see cref="Grammar"/>:
/// <code>
/// root   ::= answer | "none"        # the start rule is named root
/// answer ::= "yes, " [0-9]+ ( "!" )? item{1,3}
/// item   ::= %json{"type": "integer"} # extension: a value of this JSON Schema
/// </code>
/// Literals take escapes (<c>\n \t \r \\ \" \xHH \uHHHH</c>), classes take ranges and <c>^</c>, <c>.</c> is any
/// character, quantifiers are <c>* + ? {m} {m,} {m,n}</c>, and <c>#</c> starts a comment. Extensions:
/// <c>%json{...}</c> (a value of that JSON Schema) and <c>%text_without("...")</c> (any text not containing the string). A rule's definition runs
/// until the next <c>name ::=</c>. Unknown rule names, a missing root and syntax errors are
/// <see cref="GrammarException"/>s with the position.
/// </summary>
internal sealed class GbnfGrammar
{
    private readonly string _t;
    private readonly Grammar _g = new();
    private readonly Dictionary<string, int> _rules = [];
    private readonly HashSet<string> _defined = [];
    private readonly bool _compactJson;
    private readonly bool _strictJson;
    private int _i;

    private GbnfGrammar(string text, bool compactJson, bool strictJson)
    {
        _strictJson = strictJson;
        _t = text;
        _compactJson = compactJson;
    }

    public static Grammar Parse(string text, bool compactJson, bool strictJson)
    {
        var p = new GbnfGrammar(text, compactJson, strictJson);
        p.ParseAll();
        return p._g;
    }

    private GrammarException Error(string what)
    {
        int line = 1 + _t.Take(Math.Min(_i, _t.Length)).Count(c => c == '\n');
        int col = _i - (_t.LastIndexOf('\n', Math.Max(0, Math.Min(_i, _t.Length) - 1)) + 1) + 1;
        return new GrammarException($"the grammar does not parse: {what} at line {line}, column {col}");
    }

    private int RuleNumber(string name)
    {
        if (!_rules.TryGetValue(name, out int r)) _rules[name] = r = _g.Declare(name);
        return r;
    }

    private void ParseAll()
    {
        SkipSpace(newlines: true);
        while (_i < _t.Length)
        {
            var name = Name() ?? throw Error("expected a rule name");
            SkipSpace(newlines: false);
            if (!_t.AsSpan(_i).StartsWith("::=")) throw Error($"expected '::=' after '{name}'");
            _i += 3;
            if (!_defined.Add(name)) throw Error($"rule '{name}' is defined twice");
            var body = Alternation(topLevel: true);
            _g.Define(RuleNumber(name), body);
            SkipSpace(newlines: true);
        }
        if (!_defined.Contains("root")) throw new GrammarException("the grammar has no 'root' rule");
        foreach (var (name, _) in _rules)
            if (!_defined.Contains(name)) throw new GrammarException($"the grammar refers to the rule '{name}', which it does not define");
        _g.Start = _rules["root"];
    }

    private string? Name()
    {
        int start = _i;
        while (_i < _t.Length && (char.IsAsciiLetterOrDigit(_t[_i]) || _t[_i] == '-' || _t[_i] == '_')) _i++;
        return _i > start ? _t[start.._i] : null;
    }

    private void SkipSpace(bool newlines)
    {
        while (_i < _t.Length)
        {
            char c = _t[_i];
            if (c == '#') { while (_i < _t.Length && _t[_i] != '\n') _i++; }
            else if (c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n')) _i++;
            else break;
        }
    }

    /// <summary>Whether a new rule definition (<c>name ::=</c>) starts at the current line's first token.</summary>
    private bool AtRuleStart()
    {
        int j = _i;
        while (j < _t.Length && (char.IsAsciiLetterOrDigit(_t[j]) || _t[j] == '-' || _t[j] == '_')) j++;
        if (j == _i) return false;
        while (j < _t.Length && (_t[j] == ' ' || _t[j] == '\t')) j++;
        return _t.AsSpan(j).StartsWith("::=");
    }

    private Rx Alternation(bool topLevel)
    {
        var alts = new List<Rx> { Sequence(topLevel) };
        while (_i < _t.Length && _t[_i] == '|')
        {
            _i++;
            alts.Add(Sequence(topLevel));
        }
        return Rx.Alt(alts.ToArray());
    }

    private Rx Sequence(bool topLevel)
    {
        var items = new List<Rx>();
        while (true)
        {
            SkipSpace(newlines: true);
            if (_i >= _t.Length || _t[_i] == '|' || _t[_i] == ')') break;
            if (topLevel && AtRuleStart()) break;
            items.Add(Quantified(Atom()));
        }
        return Rx.Seq(items.ToArray());
    }

    private Rx Quantified(Rx atom)
    {
        while (_i < _t.Length)
        {
            char c = _t[_i];
            if (c == '*') { _i++; atom = Rx.Star(atom); }
            else if (c == '+') { _i++; atom = Rx.Plus(atom); }
            else if (c == '?') { _i++; atom = Rx.Optional(atom); }
            else if (c == '{')
            {
                _i++;
                int min = Int();
                int max = min;
                if (_i < _t.Length && _t[_i] == ',')
                {
                    _i++;
                    SkipSpace(false);
                    max = _i < _t.Length && _t[_i] == '}' ? -1 : Int();
                }
                SkipSpace(false);
                if (_i >= _t.Length || _t[_i] != '}') throw Error("expected '}'");
                _i++;
                if (max >= 0 && max < min) throw Error("repetition with max below min");
                atom = Rx.Repeat(atom, min, max);
            }
            else break;
        }
        return atom;
    }

    private int Int()
    {
        SkipSpace(false);
        int start = _i;
        while (_i < _t.Length && char.IsAsciiDigit(_t[_i])) _i++;
        if (_i == start) throw Error("expected a number");
        return int.Parse(_t.AsSpan(start, _i - start), CultureInfo.InvariantCulture);
    }

    private Rx Atom()
    {
        char c = _t[_i];
        if (c == '"')
        {
            _i++;
            var sb = new StringBuilder();
            while (true)
            {
                if (_i >= _t.Length) throw Error("unterminated string");
                char ch = _t[_i];
                if (ch == '"') { _i++; break; }
                sb.Append(char.ConvertFromUtf32(CharOrEscape()));
            }
            return Rx.Literal(sb.ToString());
        }
        if (c == '[')
        {
            _i++;
            bool negate = _i < _t.Length && _t[_i] == '^';
            if (negate) _i++;
            var set = CharSet.None;
            while (true)
            {
                if (_i >= _t.Length) throw Error("unterminated character class");
                if (_t[_i] == ']') { _i++; break; }
                int lo = CharOrEscape();
                int hi = lo;
                if (_i + 1 < _t.Length && _t[_i] == '-' && _t[_i + 1] != ']')
                {
                    _i++;
                    hi = CharOrEscape();
                }
                if (hi < lo) throw Error("character range out of order");
                set = set.Union(CharSet.Of((lo, hi)));
            }
            return (negate ? set.Negate() : set).Utf8();
        }
        if (c == '.') { _i++; return CharSet.Any.Utf8(); }
        if (c == '(')
        {
            _i++;
            var inner = Alternation(topLevel: false);
            SkipSpace(true);
            if (_i >= _t.Length || _t[_i] != ')') throw Error("expected ')'");
            _i++;
            return inner;
        }
        if (c == '%' && _t.AsSpan(_i).StartsWith("%text_without("))
        {
            // Extension: any text that does not contain the given string (e.g. free text before a tool call).
            _i += "%text_without(".Length;
            SkipSpace(false);
            if (_i >= _t.Length || _t[_i] != '"') throw Error("expected a string literal in %text_without(...)");
            _i++;
            var marker = new StringBuilder();
            while (true)
            {
                if (_i >= _t.Length) throw Error("unterminated string");
                if (_t[_i] == '"') { _i++; break; }
                marker.Append(char.ConvertFromUtf32(CharOrEscape()));
            }
            SkipSpace(false);
            if (_i >= _t.Length || _t[_i] != ')') throw Error("expected ')' after %text_without(\"...\"");
            _i++;
            if (marker.Length == 0) throw Error("%text_without needs a non-empty string");
            var anyText = Rx.Star(CharSet.Any.Utf8());
            var containing = Rx.Seq(anyText, Rx.Literal(marker.ToString()), anyText);
            return new DfaRx(RuleDfa.Difference(RuleDfa.Compile(anyText), RuleDfa.Compile(containing)));
        }
        if (c == '%' && _t.AsSpan(_i).StartsWith("%json"))
        {
            _i += 5;
            SkipSpace(false);
            int start = _i;
            var rest = Encoding.UTF8.GetBytes(_t[start..]);
            var reader = new Utf8JsonReader(rest);
            try
            {
                if (!reader.Read()) throw Error("expected a JSON schema after %json");
                reader.Skip();
            }
            catch (JsonException e)
            {
                throw Error($"the schema after %json is not valid JSON ({e.Message})");
            }
            var schema = Encoding.UTF8.GetString(rest, 0, (int)reader.BytesConsumed);
            _i = start + schema.Length;
            return Rx.Ref(JsonSchemaGrammar.AddSchema(_g, schema, _compactJson, _strictJson));
        }
        var name = Name();
        if (name is null) throw Error($"unexpected '{c}'");
        return Rx.Ref(RuleNumber(name));
    }

    private int CharOrEscape()
    {
        char c = _t[_i++];
        if (c != '\\')
        {
            if (char.IsHighSurrogate(c) && _i < _t.Length && char.IsLowSurrogate(_t[_i])) return char.ConvertToUtf32(c, _t[_i++]);
            return c;
        }
        if (_i >= _t.Length) throw Error("grammar ends with '\\'");
        char e = _t[_i++];
        return e switch
        {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'x' => Hex(2),
            'u' => Hex(4),
            'U' => Hex(8),
            _ => e,
        };
    }

    private int Hex(int n)
    {
        if (_i + n > _t.Length) throw Error("short hexadecimal escape");
        if (!int.TryParse(_t.AsSpan(_i, n), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int v)) throw Error("bad hexadecimal escape");
        _i += n;
        return v;
    }
}
