"""Deterministic synthetic customer data for demos, stack seeding, workload generators and tests.

Everything here is *fake but valid*: resident IDs carry a correct GB 11643 check digit, a real
administrative-division code and a real birth date; bank cards pass Luhn and start with real UnionPay
BINs; USCCs carry both their GB 11714 and GB 32100 check characters.  That matters because the guard's
detectors check exactly these properties, so data that merely *looks* right would not exercise them.

Only the standard library is used and every function takes an explicit ``random.Random`` so a seed
reproduces the same dataset byte for byte (no wall clock, no global random state).
"""

from __future__ import annotations

import datetime as _dt
import random
import string
from decimal import Decimal

__all__ = [
    "CN_TZ",
    "account_no",
    "address",
    "bank_card",
    "chinese_name",
    "demo_dataset",
    "email",
    "landline",
    "luhn_check_digit",
    "mobile",
    "new_account",
    "new_customer",
    "new_transaction",
    "passport",
    "resident_id",
    "resident_id_check_char",
    "uscc",
]

CN_TZ = _dt.timezone(_dt.timedelta(hours=8), "CST")
"""China Standard Time; all synthetic timestamps are tz-aware in this zone."""

# A fixed "now" keeps datasets reproducible; wall-clock time would make seeds meaningless.
_EPOCH = _dt.datetime(2024, 6, 30, 18, 0, tzinfo=CN_TZ)

# --------------------------------------------------------------------------------------------------
# Administrative divisions (GB/T 2260).  ``since`` is the first year the code was in use according to
# python-stdnum's cn/loc.dat; stdnum.cn.ric rejects an ID whose birth year predates its area code, so
# resident_id() only pairs a birth year with codes that existed then.
# (code, province, city, district, since)
# --------------------------------------------------------------------------------------------------
_AREAS: tuple[tuple[str, str, str, str, int], ...] = (
    ("110101", "北京市", "北京市", "东城区", 0),
    ("110102", "北京市", "北京市", "西城区", 0),
    ("110105", "北京市", "北京市", "朝阳区", 0),
    ("110106", "北京市", "北京市", "丰台区", 0),
    ("110108", "北京市", "北京市", "海淀区", 0),
    ("120101", "天津市", "天津市", "和平区", 0),
    ("120103", "天津市", "天津市", "河西区", 0),
    ("120104", "天津市", "天津市", "南开区", 0),
    ("310101", "上海市", "上海市", "黄浦区", 0),
    ("310104", "上海市", "上海市", "徐汇区", 0),
    ("310105", "上海市", "上海市", "长宁区", 0),
    ("310106", "上海市", "上海市", "静安区", 0),
    ("310110", "上海市", "上海市", "杨浦区", 0),
    ("310115", "上海市", "上海市", "浦东新区", 1992),
    ("500103", "重庆市", "重庆市", "渝中区", 1997),
    ("130102", "河北省", "石家庄市", "长安区", 1983),
    ("140105", "山西省", "太原市", "小店区", 1997),
    ("150102", "内蒙古自治区", "呼和浩特市", "新城区", 1983),
    ("210102", "辽宁省", "沈阳市", "和平区", 1983),
    ("220102", "吉林省", "长春市", "南关区", 1983),
    ("230102", "黑龙江省", "哈尔滨市", "道里区", 1983),
    ("320102", "江苏省", "南京市", "玄武区", 1983),
    ("320506", "江苏省", "苏州市", "吴中区", 2000),
    ("330102", "浙江省", "杭州市", "上城区", 1983),
    ("330106", "浙江省", "杭州市", "西湖区", 1983),
    ("330122", "浙江省", "杭州市", "桐庐县", 0),
    ("340104", "安徽省", "合肥市", "蜀山区", 2002),
    ("340121", "安徽省", "合肥市", "长丰县", 0),
    ("350121", "福建省", "福州市", "闽侯县", 0),
    ("350203", "福建省", "厦门市", "思明区", 1983),
    ("360102", "江西省", "南昌市", "东湖区", 1983),
    ("360121", "江西省", "南昌市", "南昌县", 0),
    ("370102", "山东省", "济南市", "历下区", 1983),
    ("370202", "山东省", "青岛市", "市南区", 1983),
    ("410105", "河南省", "郑州市", "金水区", 1983),
    ("420106", "湖北省", "武汉市", "武昌区", 1983),
    ("430104", "湖南省", "长沙市", "岳麓区", 1996),
    ("430121", "湖南省", "长沙市", "长沙县", 0),
    ("440103", "广东省", "广州市", "荔湾区", 1983),
    ("440106", "广东省", "广州市", "天河区", 1985),
    ("440304", "广东省", "深圳市", "福田区", 1990),
    ("440305", "广东省", "深圳市", "南山区", 1990),
    ("450103", "广西壮族自治区", "南宁市", "青秀区", 2004),
    ("460105", "海南省", "海口市", "秀英区", 2002),
    ("510104", "四川省", "成都市", "锦江区", 1990),
    ("510107", "四川省", "成都市", "武侯区", 1990),
    ("510121", "四川省", "成都市", "金堂县", 0),
    ("520102", "贵州省", "贵阳市", "南明区", 1983),
    ("530102", "云南省", "昆明市", "五华区", 1983),
    ("610113", "陕西省", "西安市", "雁塔区", 1983),
    ("620102", "甘肃省", "兰州市", "城关区", 1983),
    ("620121", "甘肃省", "兰州市", "永登县", 0),
    ("630102", "青海省", "西宁市", "城东区", 1983),
    ("640104", "宁夏回族自治区", "银川市", "兴庆区", 2002),
    ("640121", "宁夏回族自治区", "银川市", "永宁县", 0),
    ("650102", "新疆维吾尔自治区", "乌鲁木齐市", "天山区", 1983),
)

_ROADS = (
    "人民路", "中山路", "解放路", "建设路", "和平路", "长江路", "黄河路", "文化路", "胜利路", "新华路",
    "南京东路", "世纪大道", "陆家嘴环路", "滨江大道", "学院路", "科技园路", "工业大道", "东风路",
    "青年路", "朝阳街", "光明街", "幸福巷", "梧桐巷", "花园路", "湖滨路", "体育西路", "金融街",
)
_COMMUNITIES = (
    "幸福里", "阳光花园", "锦绣家园", "翠湖苑", "金色年华", "东方明珠小区", "滨江公寓", "世纪新城",
)

# --------------------------------------------------------------------------------------------------
# Names.  Frequencies loosely follow the 2020 census top surnames; compound surnames are rare but must
# appear so masking and name detection handle them.
# --------------------------------------------------------------------------------------------------
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
    "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_COMPOUND_SURNAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "慕容", "令狐", "司徒", "夏侯")
_GIVEN = (
    "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超霞平刚桂兰华建国志红文辉玉梅鹏飞丹宇浩然子轩欣怡梓涵雨婷"
    "晨曦思远嘉怡佳琪俊杰博文天宇一鸣晓东海燕春花秋月德胜永福家豪紫萱诗雨若曦宏亮雪松立新卫东婷婷"
)

_PINYIN = (
    "wang", "li", "zhang", "liu", "chen", "yang", "huang", "zhao", "wu", "zhou", "xu", "sun", "ma", "zhu",
    "hu", "guo", "lin", "wei", "min", "jie", "hua", "ming", "fang", "yu", "hao", "xin", "yi", "ting", "lei",
)
_MAIL_DOMAINS = (
    "qq.com", "163.com", "126.com", "sina.com", "foxmail.com", "139.com", "gmail.com", "outlook.com",
)

# --------------------------------------------------------------------------------------------------
# Mobile segments (MingJing 2024 carrier table, domain.md section 3.2).
# --------------------------------------------------------------------------------------------------
_MOBILE_PREFIXES = tuple(
    str(p)
    for p in (
        *range(134, 140), 147, 148, 150, 151, 152, 157, 158, 159, 172, 178, 182, 183, 184, 187, 188, 195, 197,
        198,  # China Mobile
        130, 131, 132, 145, 146, 155, 156, 166, 167, 171, 175, 176, 185, 186, 196,  # China Unicom
        133, 149, 153, 173, 174, 177, 180, 181, 189, 190, 191, 193, 199,  # China Telecom
        192,  # China Broadnet
    )
)

# Landline area codes with the length of their local numbers.
_LANDLINE_AREAS = (
    ("010", 8), ("021", 8), ("022", 8), ("023", 8), ("020", 8), ("025", 8), ("027", 8), ("028", 8),
    ("029", 8), ("0571", 8), ("0755", 8), ("0512", 8), ("0531", 8), ("0532", 8), ("0591", 8), ("0731", 8),
    ("0871", 7), ("0951", 7), ("0971", 7),
)

# UnionPay debit/credit BINs of large Chinese banks (domain.md section 3.4) and their usual lengths.
_CARD_BINS: tuple[tuple[str, int], ...] = (
    ("622202", 19),  # ICBC
    ("621226", 19),  # ICBC
    ("622848", 19),  # ABC
    ("621700", 19),  # CCB
    ("622700", 19),  # CCB
    ("621660", 19),  # BOC
    ("622588", 16),  # CMB
    ("621286", 16),  # CMB
    ("622260", 19),  # BOCOM
    ("622188", 19),  # PSBC
    ("621799", 19),  # PSBC
    ("625802", 16),  # UnionPay credit
)

_OCCUPATIONS = (
    "教师", "工程师", "医生", "护士", "会计", "公务员", "销售", "个体工商户", "程序员", "律师", "司机",
    "厨师", "退休", "学生", "自由职业", "农民", "设计师", "经理", "快递员", "银行职员",
)
_COMPANY_SUFFIX = ("科技有限公司", "贸易有限公司", "餐饮管理有限公司", "物业服务有限公司", "商贸中心")

_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_BCRYPT_ALPHABET = "./" + string.ascii_uppercase + string.ascii_lowercase + string.digits


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


# -- check characters -------------------------------------------------------------------------------


def resident_id_check_char(first17: str) -> str:
    """GB 11643 / ISO 7064 MOD 11-2 check character for the first 17 digits."""
    s = sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[s % 11]


def luhn_check_digit(payload: str) -> str:
    """Luhn check digit to append to ``payload`` (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def _luhn_valid(number: str) -> bool:
    return luhn_check_digit(number[:-1]) == number[-1]


# -- identifiers ------------------------------------------------------------------------------------


def resident_id(
    rng: random.Random, birth: _dt.date | None = None, gender: str | None = None
) -> str:
    """An 18-character resident ID: real area code, real birth date, gendered sequence, valid check char.

    ``gender`` is 'M' (odd sequence digit) or 'F' (even); random when omitted.
    """
    if birth is None:
        start = _dt.date(1950, 1, 1).toordinal()
        end = _dt.date(2005, 12, 31).toordinal()
        birth = _dt.date.fromordinal(rng.randint(start, end))
    eligible = [a for a in _AREAS if a[4] <= birth.year]
    area = rng.choice(eligible)[0]
    if gender is None:
        gender = rng.choice("MF")
    seq = rng.randint(0, 499) * 2 + (1 if gender == "M" else 0)  # odd = male, even = female
    first17 = f"{area}{birth:%Y%m%d}{seq:03d}"
    return first17 + resident_id_check_char(first17)


def mobile(rng: random.Random) -> str:
    """An 11-digit mainland mobile number on an allocated segment (never all-same digits)."""
    return rng.choice(_MOBILE_PREFIXES) + _digits(rng, 8)


def landline(rng: random.Random) -> str:
    """A landline as ``area-local``, e.g. ``021-68881234``; local numbers never start with 0 or 1."""
    area, n = rng.choice(_LANDLINE_AREAS)
    return f"{area}-{rng.randint(2, 8)}{_digits(rng, n - 1)}"


def bank_card(rng: random.Random) -> str:
    """A Luhn-valid 16- or 19-digit UnionPay card number starting with a real bank BIN."""
    bin_, length = rng.choice(_CARD_BINS)
    payload = bin_ + _digits(rng, length - len(bin_) - 1)
    return payload + luhn_check_digit(payload)


def account_no(rng: random.Random, branch_code: str = "0101") -> str:
    """A 17-digit internal account number (branch code + serial).

    Real account numbers (as opposed to card numbers) do not reliably pass Luhn; these are made to
    *fail* it on purpose so tests can tell the two apart by checksum alone.
    """
    body = branch_code + _digits(rng, 17 - len(branch_code))
    if _luhn_valid(body):
        body = body[:-1] + str((int(body[-1]) + 1) % 10)
    return body


def uscc(rng: random.Random, authority: str = "9") -> str:
    """A Unified Social Credit Code with valid GB 11714 and GB 32100 check characters.

    ``authority`` is the first character (``9`` business registration, ``Y`` other, ...); codes that
    start with a letter are valid but rejected by python-stdnum, which the detectors work around.
    """
    area = rng.choice(_AREAS)[0]
    org = _digits(rng, 8)
    org_sum = sum(int(c) * w for c, w in zip(org, _ORG_WEIGHTS, strict=True))
    org_check = 11 - org_sum % 11
    org += "X" if org_check == 10 else ("0" if org_check == 11 else str(org_check))
    first17 = authority + "1" + area + org
    s = sum(_USCC_ALPHABET.index(c) * w for c, w in zip(first17, _USCC_WEIGHTS, strict=True))
    return first17 + _USCC_ALPHABET[(31 - s % 31) % 31]


def passport(rng: random.Random) -> str:
    """A PRC e-passport number: ``E`` + 8 digits, or ``E`` + letter (not I/O) + 7 digits."""
    if rng.random() < 0.5:
        return "E" + _digits(rng, 8)
    return "E" + rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + _digits(rng, 7)


# -- people -----------------------------------------------------------------------------------------


def chinese_name(rng: random.Random) -> str:
    """A plausible name: common (sometimes compound) surname plus a 1-2 character given name."""
    surname = rng.choice(_COMPOUND_SURNAMES) if rng.random() < 0.05 else rng.choice(_SURNAMES)
    given = "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2, 2))))
    return surname + given


def address(rng: random.Random) -> str:
    """A street address ordered province → city → district → road → number (→ building/room or floor).

    Municipalities are written once (``上海市浦东新区…``), as on real forms.
    """
    _, prov, city, district, _ = rng.choice(_AREAS)
    head = prov + district if prov == city else prov + city + district
    road = rng.choice(_ROADS)
    num = rng.randint(1, 1500)
    tail = rng.random()
    if tail < 0.4:
        building = f"{rng.choice(_COMMUNITIES)}{rng.randint(1, 30)}栋{rng.randint(1, 6)}单元"
        return f"{head}{road}{num}号{building}{rng.randint(1, 33)}{rng.randint(1, 4):02d}室"
    if tail < 0.7:
        return f"{head}{road}{num}号{rng.randint(1, 40)}楼"
    return f"{head}{road}{num}号"


def email(rng: random.Random, name_hint: str | None = None) -> str:
    """An e-mail address; QQ-style numeric mailboxes are common and included."""
    domain = rng.choice(_MAIL_DOMAINS)
    if domain == "qq.com" and rng.random() < 0.6:
        return f"{rng.randint(10000, 3999999999)}@qq.com"
    local = name_hint or "".join(rng.choice(_PINYIN) for _ in range(rng.randint(2, 3)))
    sep = rng.choice(("", ".", "_"))
    return f"{local}{sep}{rng.randint(1, 9999)}@{domain}"


def _login_name(rng: random.Random) -> str:
    return "".join(rng.choice(_PINYIN) for _ in range(2)) + _digits(rng, 4)


def _password_hash(rng: random.Random) -> str:
    """Looks like bcrypt (``$2b$12$`` + 22-char salt + 31-char hash) but is random, hashing nothing."""
    return "$2b$12$" + "".join(rng.choice(_BCRYPT_ALPHABET) for _ in range(53))


def _birth_from_id(idn: str) -> _dt.date:
    return _dt.date(int(idn[6:10]), int(idn[10:12]), int(idn[12:14]))


def _ts(rng: random.Random, start: _dt.datetime, end: _dt.datetime) -> _dt.datetime:
    span = int((end - start).total_seconds())
    return start + _dt.timedelta(seconds=rng.randint(0, max(span, 0)))


def new_customer(rng: random.Random, customer_id: int, branch_code: str = "0101") -> dict[str, object]:
    """One ``customers`` row; gender and birth_date are derived from the generated resident ID."""
    idn = resident_id(rng)
    return {
        "customer_id": customer_id,
        "name": chinese_name(rng),
        "id_number": idn,
        "mobile": mobile(rng),
        "email": email(rng),
        "address": address(rng),
        "gender": "M" if int(idn[16]) % 2 == 1 else "F",
        "birth_date": _birth_from_id(idn),
        "occupation": rng.choice(_OCCUPATIONS),
        "risk_level": rng.randint(1, 5),
        "branch_code": branch_code,
    }


def new_account(
    rng: random.Random, customer_id: int, branch_code: str = "0101", acct_no: str | None = None
) -> dict[str, object]:
    """One ``accounts`` row.  Pass ``acct_no`` when the caller must guarantee uniqueness."""
    opened = _ts(rng, _dt.datetime(2005, 1, 1, 9, tzinfo=CN_TZ), _EPOCH - _dt.timedelta(days=30))
    return {
        "account_no": acct_no or account_no(rng, branch_code),
        "customer_id": customer_id,
        "card_no": bank_card(rng),
        "account_type": rng.choices(("savings", "current", "credit"), weights=(6, 2, 2))[0],
        "balance": Decimal(rng.randint(0, 50_000_000)).scaleb(-2),
        "currency": "CNY",
        "status": rng.choices(("active", "dormant", "frozen"), weights=(90, 8, 2))[0],
        "branch_code": branch_code,
        "opened_at": opened,
    }


_PLAIN_MEMOS = (
    "工资", "房租", "还款", "水电费", "网购退款", "代缴社保", "生活费", "奖金", "信用卡还款", "利息",
)


def _memo(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return f"转账给{mobile(rng)}"
    if r < 0.2:
        return f"代{chinese_name(rng)}还款 联系电话{mobile(rng)}"
    return rng.choice(_PLAIN_MEMOS)


def new_transaction(
    rng: random.Random,
    account: dict[str, object],
    counterparties: list[str] | None = None,
    after: _dt.datetime | None = None,
) -> dict[str, object]:
    """One ``transactions`` row for ``account`` (a row from :func:`new_account`).

    ``counterparties`` are account/card numbers to pick the other side from; a fresh card otherwise.
    """
    start = after or account["opened_at"]
    assert isinstance(start, _dt.datetime)
    if rng.random() < 0.15:
        cp_name = rng.choice(("华信", "恒通", "盛达", "金桥", "新世纪")) + rng.choice(_COMPANY_SUFFIX)
    else:
        cp_name = chinese_name(rng)
    cp_acct = rng.choice(counterparties) if counterparties else bank_card(rng)
    return {
        "account_no": account["account_no"],
        "customer_id": account["customer_id"],
        "amount": Decimal(rng.randint(100, 2_000_000)).scaleb(-2),
        "direction": rng.choice("DC"),
        "counterparty_name": cp_name,
        "counterparty_account": cp_acct,
        "channel": rng.choice(("counter", "atm", "mobile", "online")),
        "memo": _memo(rng),
        "created_at": _ts(rng, max(start, _EPOCH - _dt.timedelta(days=365)), _EPOCH),
    }


def demo_dataset(seed: int, customers: int, branch_code: str = "0101") -> dict[str, list[dict[str, object]]]:
    """Rows for the demo schema: ``customers``, ``accounts``, ``transactions``, ``customer_auth``.

    Same ``seed`` and ``customers`` give identical rows.  Account numbers and login names are unique;
    each customer gets 1-2 accounts and each account about 3 transactions (2-4).
    """
    rng = random.Random(seed)
    custs: list[dict[str, object]] = []
    accts: list[dict[str, object]] = []
    txns: list[dict[str, object]] = []
    auth: list[dict[str, object]] = []
    seen_accts: set[str] = set()
    seen_logins: set[str] = set()

    for cid in range(1, customers + 1):
        custs.append(new_customer(rng, cid, branch_code))
        for _ in range(rng.choice((1, 1, 2))):
            acct = account_no(rng, branch_code)
            while acct in seen_accts:
                acct = account_no(rng, branch_code)
            seen_accts.add(acct)
            accts.append(new_account(rng, cid, branch_code, acct))
        login = _login_name(rng)
        while login in seen_logins:
            login = _login_name(rng)
        seen_logins.add(login)
        auth.append(
            {
                "customer_id": cid,
                "login_name": login,
                "password_hash": _password_hash(rng),
                "query_pin": _digits(rng, 6),
                "updated_at": _ts(rng, _EPOCH - _dt.timedelta(days=720), _EPOCH),
            }
        )

    pool = [str(a["account_no"]) for a in accts] + [str(a["card_no"]) for a in accts]
    for a in accts:
        for _ in range(rng.randint(2, 4)):
            own = (a["account_no"], a["card_no"])
            others = [p for p in rng.sample(pool, min(len(pool), 5)) if p not in own]
            txns.append(new_transaction(rng, a, others or None))

    return {"customers": custs, "accounts": accts, "transactions": txns, "customer_auth": auth}


#: The demo branch's staff: (staff_id, name, branch_code, organisation, active, roles). Branch 0101 belongs to
#: bank-a (policy/entities.json); bank-b is the acquiring bank of a transfer, whose manager is posted at 0101
#: to prepare it; t0102-01 works at another branch; x0101-01 has left.
DEMO_STAFF: tuple[tuple[str, str, str, str, bool, tuple[str, ...]], ...] = (
    ("t0101-01", "柜员甲", "0101", "bank-a", True, ("teller",)),
    ("t0101-02", "柜员乙", "0101", "bank-a", True, ("teller",)),
    ("m0101-01", "主管丙", "0101", "bank-a", True, ("manager",)),
    ("c0101-01", "合规丁", "0101", "bank-a", True, ("compliance",)),
    ("d0101-01", "数据保护戊", "0101", "bank-a", True, ("dpo",)),
    ("a0101-01", "审计己", "0101", "bank-a", True, ("auditor",)),
    ("x0101-01", "离职庚", "0101", "bank-a", False, ("teller",)),
    ("t0102-01", "柜员辛", "0102", "bank-a", True, ("teller",)),
    ("b0101-01", "收购方主管壬", "0101", "bank-b", True, ("manager",)),
    # branch 0202 (the MariaDB branch): the bank's staff directory lists every branch's staff
    ("t0202-01", "柜员癸", "0202", "bank-a", True, ("teller",)),
    ("t0202-02", "柜员子", "0202", "bank-a", True, ("teller",)),
    ("m0202-01", "主管丑", "0202", "bank-a", True, ("manager",)),
)


def demo_staff() -> dict[str, list[dict[str, object]]]:
    """Rows of `staff` and `staff_roles` for the demo branch database (the policy's Staff entities)."""
    staff = [{"staff_id": s, "name": n, "branch_code": b, "organisation": o, "active": a}
             for s, n, b, o, a, _ in DEMO_STAFF]
    roles: list[dict[str, object]] = [{"staff_id": s, "role": r} for s, *_, rs in DEMO_STAFF for r in rs]
    return {"staff": staff, "staff_roles": roles}
