using System.Globalization;
using System.Text;

namespace LocalVllm.Engine.Text.Templating;

internal enum TokenKind { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Integer, Float, Operator, Eof }

internal readonly record struct Token(TokenKind Kind, string Value, int Line, int Column);

/// <summary>
/// Splits a template into text and tag tokens with Hugging Face's settings: <c>trim_blocks</c> (the newline after a
/// block tag goes) and <c>lstrip_blocks</c> (whitespace before a block tag at the start of a line goes), plus the
/// <c>-</c> markers that strip whitespace on one side of a tag. Comments are dropped.
/// </summary>
internal static class JinjaLexer
{
    private static readonly string[] Operators =
        ["//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"];

    public static List<Token> Tokenize(string source)
    {
        var tokens = new List<Token>();
        int pos = 0;
        bool stripNextLeading = false;
        while (pos < source.Length)
        {
            int open = FindTagStart(source, pos);
            int textEnd = open < 0 ? source.Length : open;
            string text = source[pos..textEnd];
            if (stripNextLeading) { text = text.TrimStart(); stripNextLeading = false; }
            if (open >= 0)
            {
                char kind = source[open + 1];
                bool minus = open + 2 < source.Length && source[open + 2] == '-';
                bool plus = open + 2 < source.Length && source[open + 2] == '+';
                if (minus) text = text.TrimEnd();
                else if (kind is '%' or '#' && !plus) text = LstripBlock(source, textEnd, text);
            }
            if (text.Length > 0) tokens.Add(new Token(TokenKind.Text, text, LineOf(source, pos), ColumnOf(source, pos)));
            if (open < 0) break;

            char k = source[open + 1];
            int inner = open + 2;
            if (inner < source.Length && source[inner] is '-' or '+') inner++;
            if (k == '#')
            {
                int close = source.IndexOf("#}", inner, StringComparison.Ordinal);
                if (close < 0) throw Error(source, open, "unclosed comment '{#'");
                bool rminus = source[close - 1] == '-';
                pos = close + 2;
                if (rminus) stripNextLeading = true;
                else pos = TrimBlockNewline(source, pos);
                continue;
            }
            tokens.Add(new Token(k == '{' ? TokenKind.VarBegin : TokenKind.BlockBegin, "", LineOf(source, open), ColumnOf(source, open)));
            string end = k == '{' ? "}}" : "%}";
            pos = LexExpression(source, inner, end, tokens, out bool closeMinus);
            tokens.Add(new Token(k == '{' ? TokenKind.VarEnd : TokenKind.BlockEnd, "", LineOf(source, pos), ColumnOf(source, pos)));
            pos += 2;
            if (closeMinus) stripNextLeading = true;
            else if (k == '%') pos = TrimBlockNewline(source, pos);
        }
        tokens.Add(new Token(TokenKind.Eof, "", LineOf(source, source.Length), ColumnOf(source, source.Length)));
        return tokens;
    }

    private static int FindTagStart(string s, int from)
    {
        for (int i = s.IndexOf('{', from); i >= 0 && i + 1 < s.Length; i = s.IndexOf('{', i + 1))
            if (s[i + 1] is '{' or '%' or '#') return i;
        return -1;
    }

    /// <summary>lstrip_blocks: drop spaces and tabs between the start of the line and a block tag.</summary>
    private static string LstripBlock(string source, int tagStart, string text)
    {
        int i = tagStart;
        while (i > 0 && source[i - 1] is ' ' or '\t') i--;
        if (i != 0 && source[i - 1] != '\n') return text;
        int strip = tagStart - i;
        return strip <= text.Length ? text[..^strip] : text;
    }

    private static int TrimBlockNewline(string source, int pos)
    {
        if (pos < source.Length && source[pos] == '\n') return pos + 1;
        if (pos + 1 < source.Length && source[pos] == '\r' && source[pos + 1] == '\n') return pos + 2;
        return pos;
    }

    private static int LexExpression(string s, int pos, string end, List<Token> tokens, out bool closeMinus)
    {
        while (true)
        {
            while (pos < s.Length && char.IsWhiteSpace(s[pos])) pos++;
            if (pos >= s.Length) throw Error(s, pos, $"unclosed tag: expected '{end}'");
            if (s[pos] == '-' && string.CompareOrdinal(s, pos + 1, end, 0, 2) == 0) { closeMinus = true; return pos + 1; }
            if (string.CompareOrdinal(s, pos, end, 0, 2) == 0) { closeMinus = false; return pos; }
            int line = LineOf(s, pos), col = ColumnOf(s, pos);
            char c = s[pos];
            if (char.IsLetter(c) || c == '_')
            {
                int start = pos;
                while (pos < s.Length && (char.IsLetterOrDigit(s[pos]) || s[pos] == '_')) pos++;
                tokens.Add(new Token(TokenKind.Name, s[start..pos], line, col));
            }
            else if (char.IsDigit(c))
            {
                int start = pos;
                while (pos < s.Length && (char.IsDigit(s[pos]) || s[pos] == '_')) pos++;
                bool isFloat = pos + 1 < s.Length && s[pos] == '.' && char.IsDigit(s[pos + 1]);
                if (isFloat) { pos++; while (pos < s.Length && (char.IsDigit(s[pos]) || s[pos] == '_')) pos++; }
                // An exponent (1e3, 2.5E-2) makes a float, as in Python.
                int exp = pos < s.Length && s[pos] is 'e' or 'E' ? pos + 1 : -1;
                if (exp > 0 && exp < s.Length && s[exp] is '+' or '-') exp++;
                if (exp > 0 && exp < s.Length && char.IsDigit(s[exp]))
                {
                    isFloat = true;
                    pos = exp;
                    while (pos < s.Length && char.IsDigit(s[pos])) pos++;
                }
                tokens.Add(new Token(isFloat ? TokenKind.Float : TokenKind.Integer, s[start..pos].Replace("_", ""), line, col));
            }
            else if (c is '\'' or '"')
            {
                var sb = new StringBuilder();
                pos++;
                while (pos < s.Length && s[pos] != c)
                {
                    if (s[pos] == '\\' && pos + 1 < s.Length)
                    {
                        pos++;
                        // Python's escapes: \xhh, \uhhhh and \Uhhhhhhhh name a code point; an unknown escape stays as written.
                        int hex = s[pos] switch { 'x' => 2, 'u' => 4, 'U' => 8, _ => 0 };
                        if (hex > 0 && pos + hex < s.Length
                            && int.TryParse(s.AsSpan(pos + 1, hex), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int code))
                        {
                            if (code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF && hex == 8)) throw Error(s, pos, $"invalid escape '\\{s[pos]}{s.Substring(pos + 1, hex)}'");
                            sb.Append(code >= 0xD800 && code <= 0xDFFF ? ((char)code).ToString() : char.ConvertFromUtf32(code));
                            pos += hex + 1;
                            continue;
                        }
                        sb.Append(s[pos] switch
                        {
                            'n' => "\n", 't' => "\t", 'r' => "\r", '\\' => "\\", '\'' => "'", '"' => "\"",
                            'a' => "\a", 'b' => "\b", 'f' => "\f", 'v' => "\v", '0' => "\0",
                            _ => "\\" + s[pos],
                        });
                        pos++;
                    }
                    else sb.Append(s[pos++]);
                }
                if (pos >= s.Length) throw Error(s, pos, "unterminated string literal");
                pos++;
                tokens.Add(new Token(TokenKind.String, sb.ToString(), line, col));
            }
            else
            {
                var op = Operators.FirstOrDefault(o => string.CompareOrdinal(s, pos, o, 0, o.Length) == 0)
                    ?? throw Error(s, pos, $"unexpected character '{c}'");
                pos += op.Length;
                tokens.Add(new Token(TokenKind.Operator, op, line, col));
            }
        }
    }

    internal static TemplateException Error(string s, int pos, string what) =>
        new($"Chat template error at line {LineOf(s, pos)}, column {ColumnOf(s, pos)}: {what}.");

    private static int LineOf(string s, int pos) => 1 + s.AsSpan(0, Math.Min(pos, s.Length)).Count('\n');

    private static int ColumnOf(string s, int pos)
    {
        pos = Math.Min(pos, s.Length);
        int nl = pos == 0 ? -1 : s.LastIndexOf('\n', pos - 1);
        return pos - nl;
    }
}
